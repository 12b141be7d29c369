"""Engines for fault and placement tests, importable inside Ray actors (tests/ is on their
path): dry-run scores, plus the behaviour a test needs, set through `engine_kwargs`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ray_app.engines.dry_run import DryRunEngine


class RecordingEngine(DryRunEngine):
    """Records where it runs (pid, node, GPUs Ray gave it) in engine_kwargs['record_dir'] and,
    with engine_kwargs['seconds_per_call'], works slowly enough to be killed mid-job."""

    name = "recording"

    def __init__(self, config):
        super().__init__(config)
        self.options = config.engine_kwargs
        folder = self.options.get("record_dir")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            Path(folder, f"{os.getpid()}.json").write_text(json.dumps(_where_am_i()))

    def score(self, conversations):
        time.sleep(self.options.get("seconds_per_call", 0))
        folder = self.options.get("record_dir")
        if folder:  # one line per call: which actor did the work, and when it ended
            with open(Path(folder, f"{os.getpid()}.calls"), "a") as calls:
                calls.write(f"{len(conversations)} {time.time()}\n")
        return super().score(conversations)


class DeadEngine(DryRunEngine):
    """Fails every call, as a GPU in a sticky CUDA error state does, while the file named by
    engine_kwargs['broken_flag'] exists."""

    name = "dead-while-flagged"

    def score(self, conversations):
        if Path(self.config.engine_kwargs["broken_flag"]).exists():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().score(conversations)


def _where_am_i() -> dict:
    import ray

    context = ray.get_runtime_context()
    return {"pid": os.getpid(), "node_id": context.get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
