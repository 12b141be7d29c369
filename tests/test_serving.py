"""The first labelling endpoint over real HTTP on 127.0.0.1 with a tiny model."""

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir):
    ray = pytest.importorskip("ray")
    from ray import serve

    from ray_app.serving import build_app

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": 18123})
    app = build_app({"conditions": ["spinal_cancer", "spinal_canal_stenosis"],
                     "engine": {"model": str(tiny_model_dir)}})
    serve.run(app, name="labeller", route_prefix="/")
    yield "http://127.0.0.1:18123"
    serve.shutdown()
    ray.shutdown()


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_label_round_trip(endpoint):
    status, body = post(f"{endpoint}/v1/label",
                        {"report": "FINDINGS: Severe stenosis at L4-L5.", "conditions": None})
    assert status == 200, body
    keys = {(r["condition"], r["level"]) for r in body["results"]}
    assert ("spinal_cancer", None) in keys and ("spinal_canal_stenosis", "L4-L5") in keys
    assert len(keys) == 7 and all(0 <= r["score"] <= 1 for r in body["results"])


def test_concurrent_requests_get_their_own_rows(endpoint):
    reports = [f"FINDINGS: finding number {i}." for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: post(f"{endpoint}/v1/label",
                                               {"report": r, "conditions": ["spinal_cancer"]}),
                                reports))
    assert all(status == 200 and len(body["results"]) == 1 for status, body in answers)
    direct = [post(f"{endpoint}/v1/label", {"report": r, "conditions": ["spinal_cancer"]})[1]
              for r in reports[:2]]
    assert [d["results"][0]["score"] for d in direct] == pytest.approx(
        [answers[i][1]["results"][0]["score"] for i in range(2)], abs=1e-5)


def test_unknown_condition_is_a_404_naming_it(endpoint):
    status, body = post(f"{endpoint}/v1/label", {"report": "x", "conditions": ["gout"]})
    assert status == 404 and "gout" in body["detail"]


def test_empty_report_is_rejected(endpoint):
    status, _ = post(f"{endpoint}/v1/label", {"report": ""})
    assert status == 422
