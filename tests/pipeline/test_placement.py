"""Engine actor / training worker placement from the configuration (ray_app/pipeline/placement.py)."""

from __future__ import annotations

import pytest

from ray_app.pipeline.placement import Capacity, gpus_in_autoscaling_config, plan

AUTOSCALING_EMPTY = Capacity(gpus_now=0, cpus_now=0, cpus_per_node=0, gpus_reachable=4)
CPU_ONLY = Capacity(gpus_now=0, cpus_now=16, cpus_per_node=8, gpus_reachable=0)


def test_cuda_asks_for_gpus_on_a_cluster_that_has_none_yet():
    where = plan("cuda", Capacity(gpus_now=0, cpus_now=0, gpus_reachable=0))
    assert where.use_gpu and where.remote_args() == {"num_gpus": 1.0, "num_cpus": 1.0}
    assert where.max_workers == 1


def test_auto_uses_the_gpus_the_autoscaler_can_reach():
    where = plan("auto", AUTOSCALING_EMPTY, gpus_per_worker=2)
    assert where.use_gpu and where.gpus == 2 and where.max_workers == 2
    assert where.worker_resources() == {"CPU": 1.0, "GPU": 2.0}
    assert plan("auto", AUTOSCALING_EMPTY, max_workers=3).max_workers == 3


def test_auto_on_a_cpu_cluster_and_cpu_when_told():
    where = plan("auto", CPU_ONLY, cpus_per_worker=2, spare_cpus=1)
    assert not where.use_gpu and where.remote_args() == {"num_cpus": 2}
    assert where.max_workers == 7 and where.cpu_threads == 1
    assert not plan("cpu", Capacity(gpus_now=8, gpus_reachable=8)).use_gpu
    with pytest.raises(ValueError, match="not one of"):
        plan("gpu0", CPU_ONLY)


def test_gpus_in_autoscaling_config_sums_declared_gpu_node_types(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("max_workers: 5\navailable_node_types:\n"
                    "  head: {resources: {CPU: 0}}\n"
                    "  l4: {resources: {CPU: 4, GPU: 1}, max_workers: 3}\n"
                    "  a10g: {resources: {GPU: 4}}\n"
                    "  cpu: {resources: {CPU: 16}, max_workers: 8}\n")
    assert gpus_in_autoscaling_config(str(path)) == 3 * 1 + 5 * 4
    assert gpus_in_autoscaling_config(str(tmp_path / "missing.yaml")) == 0
