"""Ray Serve app: live labels from the same Labeller the batch job uses.

    serve run serve_config.yaml        (or: serve deploy serve_config.yaml on a running cluster)
    curl -X POST localhost:8000/v1/label -d '{"report": "...", "conditions": ["spinal_cancer"]}'

A first version of the labelling endpoint; MRI predictions, auth and limits come with the
serving issue.
"""


# No `from __future__ import annotations`: FastAPI reads the annotations at runtime.
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from ray import serve

from ray_app.calibration import Calibration
from ray_app.conditions import builtin_condition_names, load_conditions
from ray_app.engines import EngineConfig, make_engine
from ray_app.labeller import Labeller, ReportTask

api = FastAPI(title="ray_app labeller")


class LabelRequest(BaseModel):
    report: str = Field(min_length=1, description="Report text (never logged).")
    conditions: list[str] | None = Field(None, description="Default: every served condition.")


class AppArgs(BaseModel):
    conditions: list[str] = Field(description="Condition names or YAML paths to serve.")
    method: str = "direct"
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineConfig fields.")
    calibration: str | None = None
    max_batch_size: int = 16


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class LabellerApp:
    def __init__(self, args: AppArgs):
        conditions = load_conditions(args.conditions)
        self.served = [c.name for c in conditions]
        calibration = Calibration.load(args.calibration) if args.calibration else None
        engine = make_engine(EngineConfig.from_dict(args.engine))
        self.labeller = Labeller(engine, conditions, args.method, calibration=calibration)
        self._label_batch.set_max_batch_size(args.max_batch_size)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _label_batch(self, tasks: list[ReportTask]) -> list[list[dict]]:
        # One engine call for every request that arrived together.
        rows = self.labeller.label(tasks)
        return [[r for r in rows if r["report_id"] == t.report_id] for t in tasks]

    @api.post("/v1/label")
    async def label(self, request: LabelRequest) -> dict:
        conditions = request.conditions or self.served
        unknown = sorted(set(conditions) - set(self.served))
        if unknown:
            raise HTTPException(404, f"conditions {unknown} are not served; served: {self.served}")
        task = ReportTask(f"req-{uuid.uuid4().hex}", request.report, tuple(conditions))
        rows = await self._label_batch(task)
        return {"results": [{k: v for k, v in r.items() if k != "report_id"} for r in rows]}

    @api.get("/v1/conditions")
    async def conditions(self) -> dict:
        return {"served": self.served, "builtin": builtin_condition_names()}

    @api.get("/healthz")
    async def health(self) -> dict:
        return {"status": "ok"}


def build_app(args: dict[str, Any]) -> serve.Application:
    return LabellerApp.bind(AppArgs(**args))
