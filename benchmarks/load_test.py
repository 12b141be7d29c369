"""Load test of the labelling endpoint: throughput and p50 / p95 / p99 latency at rising
concurrency, with dynamic batching on and off, side by side in one run; also how many requests
each engine call took on average (from the app's /v1/stats), and the slowest GET /readyz of a
probe sent every 0.25 s during each level (the labeller replica must answer while it works).

    python benchmarks/load_test.py --model tiny                      # a tiny random model
    python benchmarks/load_test.py --model smollm2-135m-instruct --concurrency 1 4 16
    python benchmarks/load_test.py --url http://127.0.0.1:8000       # an app already running

Bounded on purpose: at most --requests per level and --max-seconds per level, and only loopback
addresses (a load test must not be pointed at someone else's server by accident). Without --url
it starts local Ray Serve twice, once per batching setting, on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

REPORTS = [
    "FINDINGS: Moderate central canal stenosis at L4-L5. IMPRESSION: Stenosis at L4-L5.",
    "FINDINGS: Normal alignment, no stenosis. IMPRESSION: Normal lumbar spine MRI.",
    "FINDINGS: Lytic lesions in L2 and L4 with enhancement. IMPRESSION: Vertebral metastases.",
    "FINDINGS: Right paracentral disc extrusion at L5-S1. IMPRESSION: L5-S1 disc extrusion.",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def post(url: str, report: str) -> float:
    body = json.dumps({"report": report, "conditions": ["spinal_cancer"]}).encode()
    request = urllib.request.Request(f"{url}/v1/label", body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()
    return time.perf_counter() - started


def engine_stats(url: str) -> dict | None:
    """Engine calls and requests so far (GET /v1/stats), or None where the app does not say."""
    try:
        with urllib.request.urlopen(f"{url}/v1/stats", timeout=30) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def probe(url: str) -> float:
    """Seconds GET /readyz takes (it asks the labeller replica; 503 after 5 s without an answer);
    300 where no answer comes at all."""
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=300) as response:
            response.read()
    except urllib.error.HTTPError:
        pass  # 503 "not ready": an answer all the same, timed like one
    except OSError:
        return 300.0
    return time.perf_counter() - started


def run_level(url: str, concurrency: int, requests: int, max_seconds: float) -> dict:
    """Keep `concurrency` requests in flight until `requests` are done or time is up, probing
    /readyz every 0.25 s meanwhile (a replica busy with the model should still answer)."""
    deadline = time.monotonic() + max_seconds
    before = engine_stats(url)
    latencies: list[float] = []
    probes: list[float] = []
    done = threading.Event()

    def prober() -> None:
        while not done.wait(0.25):
            probes.append(probe(url))

    def worker(i: int) -> None:
        n = i
        while n < requests and time.monotonic() < deadline:
            latencies.append(post(url, REPORTS[n % len(REPORTS)]))
            n += concurrency

    probing = threading.Thread(target=prober, daemon=True)
    probing.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    elapsed = time.perf_counter() - started
    done.set()
    probing.join()
    after = engine_stats(url)
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 \
        else latencies * 99
    calls = after["batches"] - before["batches"] if before and after else 0
    return {"concurrency": concurrency, "requests": len(latencies),
            "throughput": len(latencies) / elapsed, "p50": q[49], "p95": q[94], "p99": q[98],
            # requests per engine call (dynamic batching at work); nan where /v1/stats is closed
            "per_call": (after["requests"] - before["requests"]) / calls if calls else float("nan"),
            "probe_max": max(probes, default=float("nan"))}


def serve_locally(engine: dict, max_batch_size: int, port: int) -> str:
    from ray import serve

    from ray_app.serving.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"conditions": ["spinal_cancer"], "engine": engine,
                     "allow_uncalibrated": True, "max_batch_size": max_batch_size})
    serve.run(app, name="loadtest", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def engine_for(model: str, batch_size: int) -> dict:
    if model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_model import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp(prefix="tiny-llama-"))))
    return {"model": model, "batch_size": batch_size, "dtype": "float32"}


def measure(url: str, args: argparse.Namespace) -> list[dict]:
    post(url, REPORTS[0])  # warm up: first call loads lazily-built pieces
    return [run_level(url, c, args.requests, args.max_seconds) for c in args.concurrency]


def table(results: dict[str, list[dict]]) -> str:
    lines = [f"{'batching':9} {'conc':>4} {'reqs':>5} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} "
             f"{'p99 s':>7} {'req/call':>8} {'readyz max s':>12}"]
    for name, rows in results.items():
        for r in rows:
            lines.append(f"{name:9} {r['concurrency']:4d} {r['requests']:5d} "
                         f"{r['throughput']:7.2f} {r['p50']:7.3f} {r['p95']:7.3f} {r['p99']:7.3f} "
                         f"{r['per_call']:8.1f} {r['probe_max']:12.3f}")
    if {"on", "off"} <= set(results):
        for on, off in zip(results["on"], results["off"]):
            lines.append(f"concurrency {on['concurrency']}: batching on / off throughput = "
                         f"{on['throughput'] / off['throughput']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an app already running on loopback; else start one")
    parser.add_argument("--model", default="tiny", help="'tiny' or a model for EngineConfig")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=64, help="at most this many per level")
    parser.add_argument("--max-seconds", type=float, default=60, help="at most this long per level")
    parser.add_argument("--batch-size", type=int, default=16, help="batching on: requests merged")
    parser.add_argument("--batching", nargs="+", choices=["on", "off"], default=["on", "off"],
                        help="which settings to measure (without --url)")
    args = parser.parse_args()
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            raise SystemExit(f"{args.url}: the load test only targets loopback addresses")
        print(table({"(given)": measure(args.url, args)}))
        return
    import ray
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False)
    results = {}
    for name in args.batching:
        size = args.batch_size if name == "on" else 1
        url = serve_locally(engine_for(args.model, size), size, port=18321)
        results[name] = measure(url, args)
        serve.shutdown()
    print(f"model {args.model}; {ray.cluster_resources().get('CPU', 0):.0f} CPUs")
    print(table(results))


if __name__ == "__main__":
    main()
