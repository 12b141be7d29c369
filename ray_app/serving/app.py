"""Ray Serve app: live labels from the same Labeller the batch job uses, and MRI predictions from
the same classifiers the imaging jobs train.

    serve run serve_config.yaml        (or: serve deploy serve_config.yaml on a running cluster)
    curl -X POST localhost:8000/v1/label -H 'Content-Type: application/json' \
        -d '{"report": "...", "conditions": ["spinal_cancer"]}'

Three deployments: `Gateway` (FastAPI ingress: auth, limits, validation, OpenAPI at
/openapi.json), `LabellerDeployment` (the LLM, with dynamic batching; one GPU per replica where
the config asks) and `MriDeployment` (ResNet18 embeddings and SVM / NSK-SVM classifiers). Report
text is never logged: only ids, statuses and sizes are.
"""

# No `from __future__ import annotations`: FastAPI reads the annotations at runtime.
import asyncio
import logging
import os
import time
import uuid
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from fastapi import FastAPI, File, Form, Header, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from ray_app.engines import EngineConfig
from ray_app.labelling import few_shot
from ray_app.labelling.conditions import builtin_condition_names, load_conditions
from ray_app.labelling.labeller import Labeller, ReportTask
from ray_app.labelling.run_setup import RunSetup
from ray_app.serving.request_safety import (
    RequestRejected,
    allowed_uri,
    check_bearer,
    check_report,
    check_size,
)

log = logging.getLogger(__name__)
READY_WITHIN_S = 10.0  # /readyz trusts a backend that answered a call this recently
api = FastAPI(title="ray_app", version="0.1",
              description="Calibrated labels from radiology reports, and MRI predictions.")


class AppArgs(BaseModel):
    # A misspelt argument (max_batch_sise: 32) is refused by name instead of silently ignored.
    model_config = ConfigDict(extra="forbid")

    conditions: list[str] = Field(description="Condition names or YAML paths to serve.")
    method: str = Field("direct", description="'direct' or 'summary'.")
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineConfig fields.")
    calibration: str | None = Field(None, description="Calibration JSON from jobs/calibrate.py.")
    allow_uncalibrated: bool = Field(
        False, description="Answer conditions the calibration lacks with scores only (no label); "
                           "otherwise they are refused with 422.")
    prompt: str | None = Field(
        None, description="YAML prompt variant(s), or a built-in: 'paper', 'report_first', "
        "'definitions_first'; "
        "None: the one the conditions' YAMLs ask for, else 'paper'.")
    prompt_name: str | None = Field(None, description="Variant of a --prompt file with several.")
    unit: str | None = Field(None, description="'report' or 'sentence' for every condition; "
                             "None: each condition's own.")
    few_shot_pool: str | None = Field(
        None, description="Reports table (report_id, text) that conditions with 'few_shot: "
                          "auto' take their examples from; required for them.")
    few_shot_truth: str | None = Field(None, description="Hand labels of the few_shot_pool reports.")
    max_batch_size: int = Field(16, description="Requests merged into one engine call.")
    batch_wait_timeout_s: float = Field(0.02, description="How long a batch waits to fill.")
    max_report_chars: int = Field(100_000, description="Longest report accepted.")
    max_request_bytes: int = Field(1 << 20, description="Largest JSON request body.")
    max_upload_bytes: int = Field(512 << 20, description="Largest DICOM upload (all files).")
    auth_token_env: str | None = Field(
        None, description="Environment variable holding the bearer token; unset: no auth.")
    storage_roots: list[str] = Field(
        default_factory=list, description="Folders / s3:// prefixes MRI requests may name.")
    mri_classifiers: list[str] = Field(
        default_factory=list, description="Folders of trained MRI classifiers to serve.")
    mri_weights: str | None = Field(None, description="ResNet18 weights file for embeddings.")
    retry_timeout_s: float = Field(
        120.0, description="How long a request waits for a replacement when its replica dies.")


class LabelRequest(BaseModel):
    report: str = Field(description="Report text (never logged).")
    conditions: list[str] | None = Field(None, description="Default: every served condition.")


def run_setup(args: AppArgs) -> RunSetup:
    """The served labeller's setup, as a label job builds its own (ray_app/labelling/run_setup.py)."""
    return RunSetup.build(method=args.method, conditions=args.conditions,
                          engine=EngineConfig.from_dict(args.engine), prompt=args.prompt,
                          prompt_name=args.prompt_name, unit=args.unit,
                          calibration=args.calibration,
                          few_shot_pool=args.few_shot_pool, few_shot_truth=args.few_shot_truth)


def make_labeller(args: AppArgs) -> Labeller:
    # Conditions the calibration lacks are served with scores only (refused per request).
    return run_setup(args).labeller(calibrate_every_condition=False)


class EngineQueue:
    """A replica's engine, called on one thread the replica owns, one call at a time (engines are
    not thread-safe), so that the replica's event loop stays free while the model works: requests
    keep arriving and health / info calls answer. Tasks submitted while a call runs wait, and the
    next call takes them all together (at most `max_batch_size`)."""

    def __init__(self, label: Callable[[Sequence[ReportTask]], list[dict]], max_batch_size: int):
        self._label = label
        self.max_batch_size = max_batch_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._pending: deque[tuple[ReportTask, asyncio.Future]] = deque()
        self._runner: asyncio.Task | None = None
        self.calls = self.tasks = 0

    def submit(self, tasks: Sequence[ReportTask]) -> list[asyncio.Future]:
        """One future per task, resolved with the task's rows (or the engine's exception)."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in tasks]
        self._pending.extend(zip(tasks, futures))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        return futures

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            chunk = []
            while self._pending and len(chunk) < self.max_batch_size:
                task, future = self._pending.popleft()
                if not future.done():  # done here: its caller gave up (cancelled)
                    chunk.append((task, future))
            if not chunk:
                continue
            self.calls += 1
            self.tasks += len(chunk)
            try:
                rows = await loop.run_in_executor(self._executor, self._label,
                                                  [task for task, _ in chunk])
            except asyncio.CancelledError:  # the replica is shutting down
                for _, future in (*chunk, *self._pending):
                    future.cancel()
                self._pending.clear()
                raise
            except Exception as err:  # the engine failed: every request of this call gets it
                for _, future in chunk:
                    if not future.done():
                        future.set_exception(err)
                continue
            by_report: dict[str, list[dict]] = defaultdict(list)
            for row in rows:
                by_report[row["report_id"]].append(row)
            for task, future in chunk:
                if not future.done():
                    future.set_result(by_report[task.report_id])

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@serve.deployment(max_ongoing_requests=32, max_queued_requests=256)
class LabellerDeployment:
    """The LLM. Requests that arrive together are labelled in one engine call; the engine runs off
    the replica's event loop, and requests that arrive while it runs go into its next call."""

    def __init__(self, args: AppArgs):
        self.labeller = make_labeller(args)
        self.engine = EngineQueue(self.labeller.label, args.max_batch_size)
        self._label_batch.set_max_batch_size(args.max_batch_size)
        self._label_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _label_batch(self, tasks: list[ReportTask]) -> list[asyncio.Future]:
        # Hands the batch to the engine queue and returns at once, without waiting for the
        # engine: serve.batch runs one batch at a time (max_concurrent_batches=1), and a batch
        # that held that slot for a whole engine call would leave requests arriving meanwhile to
        # form many small batches of `batch_wait_timeout_s` each, queued behind it one by one.
        return self.engine.submit(tasks)

    async def label(self, task: ReportTask) -> list[dict]:
        return await (await self._label_batch(task))

    def info(self) -> dict:
        calibration = self.labeller.calibration
        calibrated = sorted({e.condition for e in calibration.entries}) if calibration else []
        return {"served": list(self.labeller.conditions), "calibrated": calibrated,
                "model": self.labeller.engine.model_id, "method": self.labeller.method,
                "calibration_id": calibration.calibration_id if calibration else None,
                "batches": self.engine.calls, "requests": self.engine.tasks}

    def __del__(self):
        if hasattr(self, "engine"):
            self.engine.close()


@serve.deployment(max_ongoing_requests=4, max_queued_requests=32)
class MriDeployment:
    """Disc embeddings and the trained MRI classifiers."""

    def __init__(self, args: AppArgs):
        from ray_app.imaging.classifiers import TrainedClassifier
        from ray_app.imaging.predict import common_settings, embedder_for

        self.classifiers = [TrainedClassifier.load(path) for path in args.mri_classifiers]
        self.embedder = embedder_for(common_settings(self.classifiers), args.mri_weights)

    def predict(self, study: Any, locations: list[dict]) -> dict:
        import pandas as pd

        from ray_app.imaging.predict import PredictionError, predict_study

        try:
            return predict_study(study, pd.DataFrame(locations), self.classifiers, self.embedder)
        except (PredictionError, ValueError, KeyError) as err:
            return {"rejected": f"{type(err).__name__}: {err}"}

    def info(self) -> dict:
        return {"classifiers": [{"condition": c.condition, "kind": c.kind}
                                for c in self.classifiers]}


def parse_locations(text: str) -> list[dict]:
    """Disc locations as a JSON list of records or CSV text (either layout of disc_volumes)."""
    import io
    import json

    import pandas as pd

    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = pd.read_csv(io.StringIO(text)).to_dict("records")
    except (ValueError, pd.errors.ParserError) as err:
        raise RequestRejected(400, f"locations: neither a JSON list nor CSV ({err})")
    if not records or not all(isinstance(r, dict) for r in records):
        raise RequestRejected(400, "locations: expected a non-empty list of disc records")
    return records


@api.exception_handler(RequestRejected)
async def _rejected(_request: Request, err: RequestRejected) -> JSONResponse:
    return JSONResponse(status_code=err.status, content={"detail": err.message})


@serve.deployment(max_ongoing_requests=256, max_queued_requests=1024)
@serve.ingress(api)
class Gateway:
    """HTTP ingress: checks every request before any model sees it."""

    def __init__(self, args: AppArgs, labeller, mri=None):
        self.args, self.labeller, self.mri = args, labeller, mri
        self.token = None
        if args.auth_token_env:
            self.token = os.environ.get(args.auth_token_env)
            if not self.token:
                raise RuntimeError(f"auth_token_env is {args.auth_token_env!r} but that "
                                   "environment variable is empty on this node; set it, or "
                                   "remove auth_token_env to serve without auth")
        self._info: dict | None = None
        self._answered: dict[str, float] = {}  # backend -> when it last answered a call

    async def _guard(self, request: Request, authorization: str | None, limit: int) -> None:
        check_bearer(authorization, self.token)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit():
            check_size(int(length), limit, "the request body")

    async def _call(self, handle, method: str, *args):
        """Call a backend deployment; 503 at capacity; retried while a dead replica is replaced,
        so a request the gateway accepted is answered."""
        deadline = time.monotonic() + self.args.retry_timeout_s
        while True:
            try:
                result = await getattr(handle, method).remote(*args)
                self._answered[handle.deployment_name] = time.monotonic()
                return result
            except BackPressureError:
                raise RequestRejected(503, "the service is at capacity; retry in a moment")
            except (RayActorError, ActorUnavailableError, DeploymentUnavailableError) as err:
                if time.monotonic() > deadline:
                    raise RequestRejected(503, "no replica could answer in time; retry later")
                log.warning("backend replica lost (%s); retrying", type(err).__name__)
                await asyncio.sleep(0.5)

    async def _labeller_info(self) -> dict:
        if self._info is None:
            self._info = await self._call(self.labeller, "info")
        return self._info

    @api.post("/v1/label")
    async def label(self, body: LabelRequest, request: Request,
                    authorization: str | None = Header(None)) -> dict:
        await self._guard(request, authorization, self.args.max_request_bytes)
        check_report(body.report, self.args.max_report_chars)
        info = await self._labeller_info()
        conditions = body.conditions or info["served"]
        self._check_conditions(conditions, info)
        task = ReportTask(f"req-{uuid.uuid4().hex}", body.report, tuple(conditions))
        rows = await self._call(self.labeller, "label", task)
        return {"results": [{k: v for k, v in r.items() if k != "report_id"} for r in rows]}

    def _check_conditions(self, conditions: list[str], info: dict) -> None:
        unknown = sorted(set(conditions) - set(info["served"]))
        if unknown:
            raise RequestRejected(404, f"conditions {unknown} are not served here; served: "
                                       f"{info['served']}")
        uncalibrated = sorted(set(conditions) - set(info["calibrated"]))
        if uncalibrated and not self.args.allow_uncalibrated:
            raise RequestRejected(422, f"conditions {uncalibrated} have no calibration on this "
                                       "server, so no label can be given; calibrate them "
                                       "(jobs/calibrate.py) or enable allow_uncalibrated")

    @api.post("/v1/mri/predict")
    async def mri_predict(self, request: Request, locations: str = Form(...),
                          files: list[UploadFile] | None = File(None),
                          uri: str | None = Form(None),
                          authorization: str | None = Header(None)) -> dict:
        await self._guard(request, authorization, self.args.max_upload_bytes)
        if self.mri is None:
            raise RequestRejected(404, "no MRI classifiers are served (mri_classifiers is empty)")
        records = parse_locations(locations)
        study = await self._study(files, uri)
        result = await self._call(self.mri, "predict", study, records)
        if "rejected" in result:
            raise RequestRejected(400, result["rejected"])
        return result

    async def _study(self, files: list[UploadFile] | None, uri: str | None):
        if bool(files) == bool(uri):
            raise RequestRejected(422, "send either DICOM files or a storage uri, not both/neither")
        if uri:
            return allowed_uri(uri, self.args.storage_roots)
        contents, total = [], 0
        for upload in files:
            data = await upload.read()
            total += len(data)
            check_size(total, self.args.max_upload_bytes, "the upload")
            contents.append(data)
        return contents

    @api.get("/v1/conditions")
    async def conditions(self, authorization: str | None = Header(None)) -> dict:
        check_bearer(authorization, self.token)
        info = await self._labeller_info()
        return {"served": info["served"], "calibrated": info["calibrated"],
                "model": info["model"], "method": info["method"],
                "calibration_id": info["calibration_id"], "builtin": builtin_condition_names()}

    @api.get("/v1/stats")
    async def stats(self, authorization: str | None = Header(None)) -> dict:
        """Batches and requests seen by the labeller replica that answers (for load tests)."""
        check_bearer(authorization, self.token)
        info = await self._call(self.labeller, "info")
        return {"batches": info["batches"], "requests": info["requests"]}

    @api.get("/healthz")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def ready(self) -> JSONResponse:
        """Ready when every backend answers. A backend that answered any call in the last
        READY_WITHIN_S seconds is not asked again: under load its request slots are full of
        label requests, and a probe queued behind them would time out on a working replica."""
        try:
            for backend in filter(None, (self.labeller, self.mri)):
                last = self._answered.get(backend.deployment_name, -READY_WITHIN_S)
                if time.monotonic() - last > READY_WITHIN_S:
                    await asyncio.wait_for(self._call(backend, "info"), timeout=5)
        except (asyncio.TimeoutError, RequestRejected) as err:
            return JSONResponse(status_code=503, content={"status": "not ready",
                                                          "detail": str(err) or "timeout"})
        return JSONResponse(content={"status": "ready"})


def build_app(args: dict[str, Any]) -> serve.Application:
    app_args = AppArgs(**args)
    # Refused here, before any replica starts: a condition asking for `few_shot: auto` without
    # an example pool (or a pool that no condition uses).
    few_shot.check_pool_args(load_conditions(app_args.conditions), app_args.method,
                             app_args.few_shot_pool, app_args.few_shot_truth)
    mri = MriDeployment.bind(app_args) if app_args.mri_classifiers else None
    return Gateway.bind(app_args, LabellerDeployment.bind(app_args), mri)
