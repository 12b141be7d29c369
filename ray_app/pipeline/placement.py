"""Where a job's engine actors and training workers run: GPUs from the configuration, never from
a snapshot of the cluster.

An autoscaling cluster holds no GPU until something asks for one, so a job that is told to use
GPUs asks Ray for them whatever the cluster holds now, and the autoscaler adds GPU nodes.
`auto` decides by what the cluster can reach, not what it holds: GPUs when it has some now, or
when its autoscaler can start nodes that have them (`reachable_gpus`), otherwise CPUs.

`plan` is plain Python (tested without Ray); `cluster_capacity` is the thin Ray layer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
# Where the cluster launcher (`ray up cluster.yaml`) leaves the cluster's config on the head
# node, which is where `ray job submit` runs a job's driver.
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"
CONFIG_ENV = "RAY_APP_AUTOSCALING_CONFIG"


@dataclass(frozen=True)
class Capacity:
    """What the cluster holds now and what its autoscaler can add."""

    gpus_now: float = 0.0
    cpus_now: float = 1.0
    cpus_per_node: int = 1  # the largest node's CPUs (CPU actors use their node's share)
    gpus_reachable: float = 0.0  # the autoscaler's ceiling; 0 when it can add none


@dataclass(frozen=True)
class Placement:
    """Resources of each engine actor / training worker, and how many may run at once."""

    use_gpu: bool
    gpus: float
    cpus: float
    max_workers: int
    cpu_threads: int | None = None  # torch threads of a CPU worker (Ray would pin it to 1)

    def remote_args(self) -> dict[str, float]:
        """`num_gpus` / `num_cpus` for Ray Data's map_batches and Ray actors."""
        return {"num_gpus": self.gpus, "num_cpus": self.cpus} if self.use_gpu else {"num_cpus": self.cpus}

    def worker_resources(self) -> dict[str, float]:
        """Ray Train's `resources_per_worker`."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.use_gpu else {})}


def wants_gpu(device: str, capacity: Capacity) -> bool:
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not one of {DEVICES}")
    if device == "auto":
        return capacity.gpus_now > 0 or capacity.gpus_reachable > 0
    return device == "cuda"


def plan(device: str, capacity: Capacity, *, gpus_per_worker: int = 1,
         cpus_per_worker: float = 1.0, max_workers: int | None = None,
         spare_cpus: float = 0.0) -> Placement:
    """One worker per `gpus_per_worker` GPUs up to what the cluster can reach (or
    `max_workers`), or CPU workers that leave `spare_cpus` for the tasks that feed them."""
    if wants_gpu(device, capacity):
        reachable = max(capacity.gpus_now, capacity.gpus_reachable)
        ceiling = max_workers or max(1, int(reachable // gpus_per_worker))
        return Placement(True, float(gpus_per_worker), cpus_per_worker, ceiling)
    ceiling = max_workers or max(1, int((capacity.cpus_now - spare_cpus) // cpus_per_worker))
    # Ray sets OMP_NUM_THREADS to a worker's CPU reservation, which would slow a CPU engine
    # that shares its node with cheap read tasks only: let each use its share of the cores.
    threads = max(1, capacity.cpus_per_node // max(1, min(ceiling, capacity.cpus_per_node)))
    return Placement(False, 0.0, cpus_per_worker, ceiling, threads)


def cluster_capacity() -> Capacity:
    """The connected Ray cluster's capacity (Ray must be initialised)."""
    import ray

    now = ray.cluster_resources()
    per_node = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return Capacity(gpus_now=now.get("GPU", 0.0), cpus_now=now.get("CPU", 1.0),
                    cpus_per_node=int(max(per_node, default=1)) or 1,
                    gpus_reachable=reachable_gpus())


def reachable_gpus() -> float:
    """GPUs the autoscaler can bring up: from the cluster config Ray publishes (autoscaler v2,
    KubeRay), else from the launcher's config file on the head node (or $RAY_APP_AUTOSCALING_CONFIG),
    else 0 (a fixed cluster: what it holds now is all there is)."""
    published = _published_max_resources()
    if published is not None:
        return float(published.get("GPU", 0))
    path = os.environ.get(CONFIG_ENV) or os.path.expanduser(LAUNCHER_CONFIG)
    return gpus_in_autoscaling_config(path) if Path(path).is_file() else 0.0


def _published_max_resources() -> dict[str, Any] | None:
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: absent or different in other Ray versions
        return None


def gpus_in_autoscaling_config(path: str) -> float:
    """Sum of max_workers x GPUs over the node types of a cluster-launcher / autoscaler YAML
    (node types without a `resources: {GPU: n}` entry count as GPU-less: declare it)."""
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        log.warning("cannot read the autoscaling config %s (%s): assuming no GPU nodes", path, err)
        return 0.0
    total = 0.0
    for node_type in (config.get("available_node_types") or {}).values():
        gpus = (node_type.get("resources") or {}).get("GPU", 0)
        total += gpus * node_type.get("max_workers", config.get("max_workers", 0))
    return total


def device_for(use_gpu: bool | None) -> str:
    """A `use_gpu` setting (None: decide) as a device."""
    return "auto" if use_gpu is None else ("cuda" if use_gpu else "cpu")


def place(device: str, **settings: Any) -> Placement:
    """`plan` on the connected Ray cluster: what every job calls."""
    where = plan(device, cluster_capacity(), **settings)
    log.info("%s workers: %s each, up to %d", "GPU" if where.use_gpu else "CPU",
             where.remote_args(), where.max_workers)
    return where


# Where each actor / worker says what it got. Set (in the cluster's environment) to a folder
# to collect one JSON per process there: how the cluster tests check placement from inside.
PLACEMENT_LOG_ENV = "RAY_APP_PLACEMENT_LOG"
# Simulated clusters advertise GPUs that do not exist; on them a GPU worker runs on the CPU.
FAKE_GPUS_ENV = "RAY_APP_FAKE_GPUS"


def record_placement(role: str) -> dict[str, Any]:
    """Log (and, with $RAY_APP_PLACEMENT_LOG, write) the node and GPUs this process holds."""
    import json

    import ray

    context = ray.get_runtime_context()
    where = {"role": role, "pid": os.getpid(), "node_id": context.get_node_id(),
             "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    log.info("%s on node %s holds GPUs %s", role, where["node_id"][:12], where["gpu_ids"])
    folder = os.environ.get(PLACEMENT_LOG_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, f"{role}-{os.getpid()}.json").write_text(json.dumps(where))
    return where


def ddp_backend(use_gpu: bool) -> str | None:
    """Ray Train's default (NCCL on GPUs, gloo on CPUs), except on a simulation's fake GPUs."""
    return "gloo" if use_gpu and os.environ.get(FAKE_GPUS_ENV) == "1" else None


def worker_device(use_gpu: bool):
    """The torch device of a training worker: its GPU when it was given one. A worker given a
    GPU that torch cannot see is a broken node (drivers, a CPU build of torch), not a reason
    to train on its CPU for days, unless the cluster is a simulation ($RAY_APP_FAKE_GPUS=1)."""
    import torch

    if not use_gpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    if os.environ.get(FAKE_GPUS_ENV) == "1":
        return torch.device("cpu")
    raise RuntimeError("this worker was given a GPU but torch sees no CUDA device: check the "
                       "node's NVIDIA driver and that torch is a CUDA build")
