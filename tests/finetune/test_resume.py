"""A fine-tuning job killed (SIGKILL, whole process group) after a checkpoint resumes from
that checkpoint's step when rerun with the same config, and finishes the schedule; a training
worker killed alone (OOM killer, lost node) is restarted from the checkpoint within the run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from synthetic import write_reports

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_EVERY, STEPS = 10, 30


def _start(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "jobs/finetune.py", "--config", str(config)],
                            cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _first_checkpoint(run: Path, proc: subprocess.Popen, timeout: float) -> Path:
    """The first checkpoint folder with every file a resume needs (what the job itself looks
    for when Ray has not recorded it): a kill between the optimizer's file and the adapter's
    leaves an incomplete folder, and the run rightly starts over (a CI flake, resumed_from [])."""
    from ray_app.finetune.ray_job import CHECKPOINT_FILES
    from ray_app.finetune.train import checkpoint_complete

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in run.glob("step-*") if checkpoint_complete(p, CHECKPOINT_FILES)]
        if done:
            return min(done)
        assert proc.poll() is None, "the job ended before writing a checkpoint"
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint under {run} within {timeout} s")


def _config(tmp_path: Path, model: Path) -> tuple[Path, Path]:
    """A 30-step summary run checkpointing every 10 steps: (its YAML, its output folder)."""
    reports, _ = write_reports(tmp_path, 12)
    output = tmp_path / "out"
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump({
        "mode": "summary", "train_input": str(reports), "output": str(output),
        "model": str(model), "learning_rate": 1e-3, "epochs": 5, "batch_size": 2,
        "max_steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY, "keep_checkpoints": 5,
        "cpus_per_worker": 0.5, "torch_threads": 1,
    }))
    return config, output


def _assert_finished_after_resuming(output: Path) -> None:
    provenance = json.loads((output / "adapter" / "training_provenance.json").read_text())
    assert provenance["steps"] == STEPS
    # The latest checkpoint written before the kill (normally step 10; 20 if the kill was late).
    assert provenance["resumed_from"] in ([CHECKPOINT_EVERY], [2 * CHECKPOINT_EVERY])
    steps = [h["step"] for h in provenance["history"]]
    assert steps == list(range(1, STEPS + 1)), "steps lost or repeated across the resume"


def test_killed_run_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    config, output = _config(tmp_path, tiny_model_dir)
    first = _start(config, tmp_path / "first.log")
    try:
        checkpoint = _first_checkpoint(output / "ray_train" / "finetune", first, timeout=200)
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = json.loads((checkpoint / "train_state.json").read_text())["step"]
    assert killed_at == CHECKPOINT_EVERY
    assert not (output / "adapter").exists(), "the first run finished before it was killed"

    second = _start(config, tmp_path / "second.log")
    assert second.wait(timeout=240) == 0, (tmp_path / "second.log").read_text()[-3000:]
    _assert_finished_after_resuming(output)


def test_a_killed_worker_is_restarted_from_the_checkpoint_within_the_run(tmp_path,
                                                                         tiny_model_dir):
    config, output = _config(tmp_path, tiny_model_dir)
    log = tmp_path / "job.log"
    job = _start(config, log)
    try:
        _first_checkpoint(output / "ray_train" / "finetune", job, timeout=200)
        # Ray prefixes each line a worker prints with its pid.
        workers = set(re.findall(r"RayTrainWorker pid=(\d+)", log.read_text()))
        assert len(workers) == 1, workers
        os.kill(int(workers.pop()), signal.SIGKILL)
        assert job.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    _assert_finished_after_resuming(output)


def test_a_checkpoint_ray_did_not_record_is_found_in_the_run_folder(tmp_path):
    from ray_app.finetune.ray_job import _unrecorded_checkpoint
    from ray_app.finetune.train import ADAPTER_DIR, OPTIMIZER_FILE, STATE_FILE, _write_manifest

    complete = (STATE_FILE, OPTIMIZER_FILE, f"{ADAPTER_DIR}/adapter_model.safetensors")

    def checkpoint(step: int) -> Path:
        folder = tmp_path / f"step-{step:08d}"
        (folder / ADAPTER_DIR).mkdir(parents=True)
        for name in complete:
            (folder / name).write_text("weights " * step)
        _write_manifest(folder)
        return folder

    assert _unrecorded_checkpoint(str(tmp_path)) is None
    assert _unrecorded_checkpoint(None) is None
    tenth = checkpoint(10)
    assert _unrecorded_checkpoint(str(tmp_path)) == str(tenth)
    # Killed while Ray copied the next one: a file missing, a file cut short, the manifest not
    # there yet; each time the tenth step is the newest complete checkpoint.
    later = checkpoint(20)
    (later / complete[2]).unlink()
    assert _unrecorded_checkpoint(str(tmp_path)) == str(tenth)
    later = checkpoint(30)
    (later / complete[1]).write_text("weights " * 7)
    assert _unrecorded_checkpoint(str(tmp_path)) == str(tenth)
    later = checkpoint(40)
    (later / "checkpoint_manifest.json").unlink()
    assert _unrecorded_checkpoint(str(tmp_path)) == str(tenth)
    fiftieth = checkpoint(50)  # a complete later one is taken
    assert _unrecorded_checkpoint(str(tmp_path)) == str(fiftieth)
