"""The jobs on simulated multi-node Ray clusters (tests/cluster_sim.py): GPU placement on an
autoscaling cluster that starts with a 0-CPU head and no GPU node, and exactly-once labels
when a worker node is lost or an engine actor is SIGKILLed mid-job.

Each job runs as its own process against the cluster, as `ray job submit` would run it; every
actor and training worker records the node and GPUs it holds (RAY_APP_PLACEMENT_LOG).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cluster_sim import autoscaling_cluster, multi_node_cluster, run_job_subprocess

from ray_app.pipeline import report_tables as tables

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GPU_NODE = {"gpu_worker": {"resources": {"CPU": 2, "GPU": 1}, "max_workers": 2}}
CONDITIONS = ["spinal_cancer", "disc_herniation"]


def _write_reports(path: Path, n: int) -> list[str]:
    ids = [f"acc-{i:04d}" for i in range(n)]
    texts = [f"FINDINGS: Report {i}. Mild disc bulge at L4-L5. No lesion.\nIMPRESSION: {i}."
             for i in range(n)]
    pd.DataFrame({"report_id": ids, "text": texts}).to_csv(path, index=False)
    return ids


def _placements(folder: Path, role: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{role}-*.json"))]


def _label_pairs(output: Path) -> list[tuple[str, str]]:
    labels = tables.read_finished(tables.locate(str(output)).child("labels"),
                                  ["report_id", "condition"])
    return list(zip(labels["report_id"], labels["condition"]))


class NodeWatch:
    """Polls the cluster's GPU worker nodes while a job runs; keeps the most seen at once."""

    def __init__(self, cluster):
        self.cluster, self.most, self._stop = cluster, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                gpu_nodes = [n for n in self.cluster.worker_nodes() if n["resources"].get("GPU")]
                self.most = max(self.most, len(gpu_nodes))
            except Exception:  # noqa: BLE001 - a poll during a node change; try again
                pass
            time.sleep(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """0-CPU head, up to two fake GPU nodes ({CPU: 2, GPU: 1}) started on demand, removed after
    6 s idle. The nodes inherit this environment: placement records, fake GPUs allowed."""
    records = tmp_path_factory.mktemp("placements")
    saved = {k: os.environ.get(k) for k in ("RAY_APP_PLACEMENT_LOG", "RAY_APP_FAKE_GPUS")}
    os.environ.update(RAY_APP_PLACEMENT_LOG=str(records), RAY_APP_FAKE_GPUS="1")
    try:
        with autoscaling_cluster(GPU_NODE, idle_timeout_s=6.0) as cluster:
            assert cluster.worker_nodes() == [], "the cluster must start without GPU nodes"
            config = tmp_path_factory.mktemp("config") / "cluster.yaml"
            config.write_text(yaml.safe_dump(cluster.config))
            cluster.records, cluster.config_file = records, config
            yield cluster
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _run(cluster, args, timeout=240, **env):
    code, out, err = run_job_subprocess(args, cluster.env(**env), timeout=timeout)
    assert code == 0, f"job failed ({code}):\n{out[-3000:]}\n{err[-5000:]}"
    return out


def _scaled_down(cluster):
    cluster.wait_for_workers(0, timeout=90)


@pytest.mark.timeout(420)
def test_label_job_asks_for_gpus_the_cluster_does_not_have_yet(gpu_cluster, tmp_path):
    ids = _write_reports(tmp_path / "reports.csv", 48)
    output = tmp_path / "out"
    args = ["jobs/label_reports.py", "--input", str(tmp_path / "reports.csv"), "--output",
            str(output), "--conditions", *CONDITIONS, "--engine", "fault_engines:RecordingEngine",
            "--model", "m", "--device", "cuda", "--max-actors", "2", "--reports-per-batch", "2",
            "--config", str(_engine_config(tmp_path, seconds_per_call=0.5))]
    with NodeWatch(gpu_cluster) as nodes:
        _run(gpu_cluster, args)
    actors = _placements(gpu_cluster.records, "label-actor")
    assert actors and all(len(a["gpu_ids"]) == 1 for a in actors), actors
    assert nodes.most == 2, f"the cluster scaled to {nodes.most} GPU node(s), not its ceiling of 2"
    pairs = _label_pairs(output)
    assert sorted(pairs) == sorted((i, c) for i in ids for c in CONDITIONS)
    _scaled_down(gpu_cluster)


def _engine_config(folder: Path, **engine_kwargs) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"engine": {"engine_kwargs": engine_kwargs}}))
    return path


@pytest.mark.timeout(420)
def test_embedding_job_with_device_auto_scales_up_for_gpus(gpu_cluster, tmp_path):
    """'auto' on a cluster that holds no GPU yet: the autoscaler's config says it can start
    two, so the encoders ask for GPUs and the autoscaler brings the nodes up."""
    from ray_app.imaging.phantoms import PhantomConfig, make_phantom_dataset

    phantoms = make_phantom_dataset(tmp_path / "phantoms", PhantomConfig(
        studies=4, seed=3, size=96, fov_mm=240.0, slices=7, noise=0.04))
    code = (
        "from ray_app.imaging.embed_job import EmbedJobConfig, run_embed_job\n"
        f"print(run_embed_job(EmbedJobConfig(dicom={str(phantoms['dicom'])!r}, "
        f"locations={str(phantoms['locations'])!r}, output={str(tmp_path / 'out')!r}, "
        "allow_random_weights=True, crop_shape=(3, 24, 48), image_size=64, batch_volumes=4, "
        "max_actors=2, device='auto')))")
    with NodeWatch(gpu_cluster) as nodes:
        out = _run(gpu_cluster, ["-c", code],
                   RAY_APP_AUTOSCALING_CONFIG=str(gpu_cluster.config_file))
    assert "discs_embedded=20" in out, out[-2000:]
    actors = _placements(gpu_cluster.records, "embed-actor")
    assert actors and all(len(a["gpu_ids"]) == 1 for a in actors), actors
    assert nodes.most == 2
    _scaled_down(gpu_cluster)


@pytest.mark.timeout(420)
def test_finetuning_workers_each_hold_one_gpu(gpu_cluster, tmp_path, tiny_model_dir):
    from finetune.synthetic import write_reports

    reports = write_reports(tmp_path, 8)[0]
    code = (
        "from ray_app.finetune.config import FinetuneConfig\n"
        "from ray_app.finetune.ray_job import run_finetune\n"
        f"p = run_finetune(FinetuneConfig(mode='summary', train_input={str(reports)!r}, "
        f"output={str(tmp_path / 'run')!r}, model={str(tiny_model_dir)!r}, epochs=1, "
        "batch_size=2, num_workers=2, use_gpu=True, torch_threads=1, checkpoint_every=1000))\n"
        "print('steps', p['steps'], 'world', p['world_size'], 'device', p['device'])")
    with NodeWatch(gpu_cluster) as nodes:
        out = _run(gpu_cluster, ["-c", code])
    assert "world 2 device cuda" in out, out[-2000:]
    workers = _placements(gpu_cluster.records, "finetune-worker")
    assert len(workers) == 2 and all(len(w["gpu_ids"]) == 1 for w in workers), workers
    assert len({w["node_id"] for w in workers}) == 2  # one GPU node each
    assert nodes.most == 2
    _scaled_down(gpu_cluster)


# --- faults on a fixed multi-node cluster ---------------------------------------------------

@pytest.fixture
def three_nodes(tmp_path, monkeypatch):
    """A 0-CPU head and two 2-CPU worker nodes; engine actors record where they run."""
    records = tmp_path / "placements"
    monkeypatch.setenv("RAY_APP_PLACEMENT_LOG", str(records))
    with multi_node_cluster(n_workers=2, cpus_per_worker=2) as cluster:
        cluster.records = records
        yield cluster


def _start_label_job(cluster, tmp_path, n_reports=60):
    ids = _write_reports(tmp_path / "reports.csv", n_reports)
    output = tmp_path / "out"
    args = ["jobs/label_reports.py", "--input", str(tmp_path / "reports.csv"), "--output",
            str(output), "--conditions", *CONDITIONS, "--engine", "fault_engines:RecordingEngine",
            "--model", "m", "--device", "cpu", "--cpus-per-actor", "0.5", "--max-actors", "2",
            "--min-actors", "2", "--reports-per-batch", "2",
            "--config", str(_engine_config(tmp_path, seconds_per_call=0.4))]
    result = {}
    thread = threading.Thread(target=lambda: result.update(zip(
        ("code", "out", "err"), run_job_subprocess(args, cluster.env(), timeout=360))))
    thread.start()
    return ids, output, thread, result


def _wait_for_labels(output: Path, thread, result, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and thread.is_alive():
        if len(_label_pairs(output)) >= 8:
            assert thread.is_alive()
            return
        time.sleep(0.2)
    raise AssertionError(f"no labels to interrupt: {result.get('err', '')[-3000:]}")


def _assert_exactly_once(output: Path, ids, thread, result):
    thread.join(timeout=400)
    assert result.get("code") == 0, f"{result.get('out', '')[-2000:]}\n{result.get('err', '')[-5000:]}"
    pairs = _label_pairs(output)
    assert len(pairs) == len(set(pairs)), "a re-run batch duplicated rows"
    assert set(pairs) == {(i, c) for i in ids for c in CONDITIONS}, "rows were lost"


@pytest.mark.timeout(480)
def test_a_worker_node_lost_mid_job_loses_and_duplicates_nothing(three_nodes, tmp_path):
    ids, output, thread, result = _start_label_job(three_nodes, tmp_path)
    _wait_for_labels(output, thread, result)
    hosting = {a["node_id"] for a in _placements(three_nodes.records, "label-actor")}
    victim = next(n for n in three_nodes.workers if n.node_id in hosting)
    before = len(_placements(three_nodes.records, "label-actor"))
    three_nodes.remove_worker(victim, allow_graceful=False)
    three_nodes.wait_for(lambda: len(three_nodes.alive_nodes()) == 2, timeout=90,
                         what="the removed node marked dead")
    _assert_exactly_once(output, ids, thread, result)
    after = _placements(three_nodes.records, "label-actor")
    assert len(after) > before, "the lost engine actor was not restarted"
    assert all(a["node_id"] != victim.node_id for a in after[before:])


@pytest.mark.timeout(480)
def test_an_engine_actor_killed_mid_job_loses_and_duplicates_nothing(three_nodes, tmp_path):
    ids, output, thread, result = _start_label_job(three_nodes, tmp_path)
    _wait_for_labels(output, thread, result)
    victim = _placements(three_nodes.records, "label-actor")[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    _assert_exactly_once(output, ids, thread, result)
    restarted = [a for a in _placements(three_nodes.records, "label-actor") if a["pid"] != victim]
    assert len(restarted) >= 2, "Ray did not restart the killed engine actor"
