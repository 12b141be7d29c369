"""The Serve app over real HTTP on 127.0.0.1 with a tiny model (ray_app/serving/app.py): round trips,
batching, every bad input, auth, overload and a replica killed under load."""

import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from ray_app.engines.dry_run import DryRunEngine
from ray_app.evaluation.calibration import Calibration, ThresholdEntry
from ray_app.labelling.conditions import load_condition
from ray_app.labelling.prompts import DEFAULT_TEMPLATE

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

PORT = 18123
BASE = f"http://127.0.0.1:{PORT}"
TOKEN_ENV, TOKEN = "RAY_APP_TEST_TOKEN", "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "ZEBRA-7731-never-in-logs"


class SlowEngine(DryRunEngine):
    """Dry-run scores after a pause: requests stay in flight long enough to pile up or to be
    caught by a replica kill."""

    name = "slow"

    def score(self, conversations):
        time.sleep(0.4)
        return super().score(conversations)


class BusyEngine(DryRunEngine):
    """Dry-run scores after a long pause (a model at work), refusing to be called twice at once:
    the engine of a replica must never run two calls together."""

    name = "busy"
    seconds = 3.0
    _active = 0
    _lock = threading.Lock()

    def score(self, conversations):
        with BusyEngine._lock:
            BusyEngine._active += 1
            overlapping = BusyEngine._active > 1
        try:
            if overlapping:
                raise RuntimeError("two engine calls at once")
            time.sleep(self.seconds)
            return super().score(conversations)
        finally:
            with BusyEngine._lock:
                BusyEngine._active -= 1


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir, tiny_engine, tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from ray_app.serving.app import AppArgs, Gateway, LabellerDeployment, build_app

    os.environ[TOKEN_ENV] = TOKEN  # inherited by the Ray workers started below
    tests = os.path.dirname(__file__)
    ray.init(num_cpus=8, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": tests, "RAY_AUTH_MODE": "disabled"}})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    calibration = tiny_calibration(tiny_engine, tmp_path_factory.mktemp("cal") / "cal.json")
    main = {"conditions": ["spinal_cancer", "spinal_canal_stenosis"],
            "engine": {"model": str(tiny_model_dir)}, "calibration": calibration,
            "auth_token_env": TOKEN_ENV, "max_report_chars": 2000, "max_request_bytes": 20000}
    serve.run(build_app(main), name="main", route_prefix="/")
    slow = AppArgs(conditions=["spinal_cancer"], engine={"engine": "test_serving:SlowEngine"},
                   allow_uncalibrated=True, max_batch_size=1, retry_timeout_s=60)
    labeller = LabellerDeployment.options(max_ongoing_requests=1, max_queued_requests=2)
    serve.run(Gateway.bind(slow, labeller.bind(slow)), name="slow", route_prefix="/slow")
    yield BASE
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def busy_endpoint(endpoint):
    """An app at /busy whose engine takes 3 s a call (torn down with the others)."""
    from ray import serve

    from ray_app.serving.app import AppArgs, Gateway, LabellerDeployment

    busy = AppArgs(conditions=["spinal_cancer"], engine={"engine": "test_serving:BusyEngine"},
                   allow_uncalibrated=True, max_batch_size=8)
    serve.run(Gateway.bind(busy, LabellerDeployment.bind(busy)), name="busy",
              route_prefix="/busy")
    return endpoint


def tiny_calibration(engine, path) -> str:
    cancer = load_condition("spinal_cancer")
    Calibration(model=engine.model_id, method="direct",
                prompt_hash=DEFAULT_TEMPLATE.template_hash("direct"),
                definition_hashes={"spinal_cancer": cancer.definition_hash()},
                entries=(ThresholdEntry("spinal_cancer", None, 0.5, 40, 20, 0.9, 0.1,
                                        band_low=0.4, band_high=0.6),)).save(path)
    return str(path)


def call(path: str, body: dict | bytes | None = None, headers: dict | None = None,
         method: str | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(BASE + path, data, {"Content-Type": "application/json",
                                                          **(headers if headers is not None else AUTH)},
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def label(report: str, conditions=("spinal_cancer",), prefix: str = "", **kw):
    return call(f"{prefix}/v1/label", {"report": report, "conditions": list(conditions)}, **kw)


def test_label_round_trip_with_calibrated_label_and_band(endpoint):
    status, body = label("FINDINGS: Lytic lesion in L2, in keeping with metastasis.")
    assert status == 200, body
    (row,) = body["results"]
    assert row["condition"] == "spinal_cancer" and 0 <= row["score"] <= 1
    assert row["label"] == (row["score"] >= 0.5) and row["threshold"] == 0.5
    assert row["uncertain"] == (0.4 <= row["score"] < 0.6)
    assert row["calibration_id"].startswith("cal-") and row["model"]


def test_concurrent_requests_are_merged_into_batches(endpoint):
    _, before = call("/v1/stats", method="GET")
    reports = [f"FINDINGS: finding number {i}." for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(label, reports))
    _, after = call("/v1/stats", method="GET")
    assert all(status == 200 and len(body["results"]) == 1 for status, body in answers)
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == 12 and batches < requests, (batches, requests)
    alone = label(reports[0])[1]["results"][0]["score"]
    assert alone == pytest.approx(answers[0][1]["results"][0]["score"], abs=1e-5)


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/label", {"report": "x", "conditions": ["gout"]}, 404, "not served here"),
    ("/v1/label", {"report": "x", "conditions": ["spinal_canal_stenosis"]}, 422,
     "have no calibration"),
    ("/v1/label", {"report": "   ", "conditions": ["spinal_cancer"]}, 422, "empty"),
    ("/v1/label", {"report": "y" * 2001}, 413, "the limit is 2,000"),
    ("/v1/label", {"report": "z" * 1990, "pad": "p" * 20000}, 413, "request body"),
    ("/v1/label", {"text": "wrong field"}, 422, "report"),
    ("/v1/mri/predict", b"", 422, "locations"),
])
def test_bad_inputs_get_their_status_and_reason(endpoint, path, body, status, message):
    code, answer = call(path, body)
    assert code == status, answer
    assert message in json.dumps(answer)


def test_malformed_json_is_422(endpoint):
    assert call("/v1/label", b"{not json")[0] == 422


def test_auth_when_enabled(endpoint):
    assert label("FINDINGS: ok.", headers={})[0] == 401
    status, body = label("FINDINGS: ok.", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and body["detail"] == "invalid bearer token"
    assert call("/v1/conditions", method="GET", headers={})[0] == 401
    assert call("/healthz", method="GET", headers={})[0] == 200  # probes need no token
    assert call("/readyz", method="GET", headers={}) == (200, {"status": "ready"})


def test_conditions_and_openapi(endpoint):
    status, body = call("/v1/conditions", method="GET")
    assert status == 200 and body["served"] == ["spinal_cancer", "spinal_canal_stenosis"]
    assert body["calibrated"] == ["spinal_cancer"] and "pneumothorax" in body["builtin"]
    with urllib.request.urlopen(BASE + "/openapi.json", timeout=30) as response:
        schema = json.loads(response.read())
    assert {"/v1/label", "/v1/mri/predict", "/v1/conditions", "/healthz", "/readyz"} <= set(
        schema["paths"])


def test_report_text_never_reaches_the_logs(endpoint):
    assert label(f"FINDINGS: {SECRET} lesion.")[0] == 200
    import ray

    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    for folder, _, files in os.walk(logs):
        for name in files:
            with open(os.path.join(folder, name), errors="ignore") as f:
                assert SECRET not in f.read(), name


@pytest.mark.timeout(120)
def test_replica_answers_and_takes_requests_while_the_engine_works(busy_endpoint):
    """The engine runs off the replica's event loop: while a 3 s engine call is in flight, calls
    that reach the labeller replica (/v1/stats, /readyz) answer at once, and two requests sent
    0.3 s apart meanwhile are both served, together in the engine's next call."""
    status, before = call("/busy/v1/stats", method="GET")
    assert status == 200, before
    results: dict[str, tuple[int, dict]] = {}

    def send(key: str) -> None:
        results[key] = label(f"FINDINGS: busy report {key}.", prefix="/busy")

    started = time.monotonic()
    first = threading.Thread(target=send, args=("first",))
    first.start()
    time.sleep(0.6)  # the first request is in the engine now (3 s)
    for path, expected in (("/v1/stats", None), ("/readyz", {"status": "ready"})):
        asked = time.monotonic()
        status, body = call(f"/busy{path}", method="GET")
        waited = time.monotonic() - asked
        assert status == 200 and (expected is None or body == expected), (path, status, body)
        assert waited < 1.0, f"{path} took {waited:.2f} s while the engine worked"
    followers = [threading.Thread(target=send, args=(key,)) for key in ("second", "third")]
    for thread in followers:
        thread.start()
        time.sleep(0.3)
    assert time.monotonic() - started < BusyEngine.seconds, "sent after the first call ended"
    for thread in (first, *followers):
        thread.join(timeout=60)
    assert sorted(results) == ["first", "second", "third"], results
    assert all(status == 200 and len(body["results"]) == 1
               for status, body in results.values()), results
    _, after = call("/busy/v1/stats", method="GET")
    assert after["requests"] - before["requests"] == 3
    assert after["batches"] - before["batches"] == 2, (before, after)  # first; second + third
    assert time.monotonic() - started < 3 * BusyEngine.seconds


def test_overload_is_answered_with_503_not_a_hang(endpoint):
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: label(f"report {i}", prefix="/slow"), range(16)))
    codes = [status for status, _ in answers]
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert set(codes) <= {200, 503}
    assert all("capacity" in body["detail"] for status, body in answers if status == 503)
    assert time.monotonic() - started < 60


def test_replica_killed_under_load_loses_no_accepted_request(endpoint):
    import ray

    results: list = []

    def send(i):
        results.append(label(f"report kill {i}", prefix="/slow"))

    # Two requests: one running, one queued (the slow app accepts 1 + 2 queued), so none is
    # refused for capacity and every one must come back whole.
    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    ray.kill(slow_labeller_replica(), no_restart=True)
    for t in threads:
        t.join(timeout=180)
    assert [status for status, _ in results] == [200, 200], results
    assert all(len(body["results"]) == 1 for _, body in results)


def slow_labeller_replica():
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "slow" in actor["name"] and "LabellerDeployment" in actor["name"]:
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError("no replica of the slow app's LabellerDeployment")
