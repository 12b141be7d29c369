"""Proof that the simulated-cluster harness (tests/cluster_sim.py) works: the fake_multinode
autoscaler launches a GPU node on demand and removes it when idle, a fixed multi-node Cluster runs
a task on each node and loses one with remove_worker, and teardown leaves no process behind.

The cluster tests are marked ``ray`` and ``slow`` (30-90 s each on 2 shared cores) and each
prints a TIMING line (run with -s to see them)."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
from cluster_sim import (
    JobTimeout,
    autoscaling_cluster,
    find_cluster_processes,
    multi_node_cluster,
    run_job_subprocess,
)

ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")


def _address_file() -> str | None:
    try:
        return ADDRESS_FILE.read_text()
    except OSError:
        return None


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line in job output:\n{stdout[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


GPU_JOB = r"""
import json, os, time
import ray

t0 = time.monotonic()
ray.init(log_to_driver=False)
connect_s = time.monotonic() - t0


@ray.remote(num_gpus=1)
class GpuActor:
    def where(self):
        return {"gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                "node_id": ray.get_runtime_context().get_node_id(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


t1 = time.monotonic()
actor = GpuActor.remote()
info = ray.get(actor.where.remote(), timeout=60)
info["launch_s"] = time.monotonic() - t1
info["connect_s"] = connect_s
info["node_resources"] = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == info["node_id"])
ray.kill(actor)
print("RESULT " + json.dumps(info), flush=True)
"""


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_autoscaler_launches_gpu_node_on_demand_and_removes_it_when_idle():
    before = _address_file()
    worker_types = {"gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 2}}
    with autoscaling_cluster(worker_types, idle_timeout_s=6) as cluster:
        nodes = cluster.alive_nodes()
        assert len(nodes) == 1 and nodes[0]["is_head"], nodes
        assert nodes[0]["ip"] == "127.0.0.1"
        assert nodes[0]["resources"].get("CPU", 0) == 0 and "GPU" not in nodes[0]["resources"]

        t0 = time.monotonic()
        rc, out, err = run_job_subprocess(["-c", GPU_JOB], cluster.env(), timeout=90)
        job_s = time.monotonic() - t0
        assert rc == 0, f"{err[-3000:]}\n{cluster.diagnostics()}"
        info = _result(out)
        # Exactly one GPU reserved, on the fake GPU node the autoscaler launched (not the head).
        assert len(info["gpu_ids"]) == 1, info
        assert info["gpu_ids"] == ["0"], info  # the fake node has one GPU: id 0
        assert info["cuda_visible_devices"] == "0", info
        assert info["node_id"] != nodes[0]["node_id"]
        assert info["node_resources"]["GPU"] == 1 and info["node_resources"]["CPU"] == 1

        # The actor is gone: the node goes idle and is removed after idle_timeout_s.
        t1 = time.monotonic()
        seen = cluster.worker_nodes()
        cluster.wait_for_workers(0, timeout=45)
        scale_down_s = time.monotonic() - t1
        assert [n["node_id"] for n in cluster.alive_nodes()] == [nodes[0]["node_id"]]
        assert all(n["node_id"] == info["node_id"] and n["node_type"] == "gpu_worker"
                   and n["ip"] == "127.0.0.1" for n in seen), seen
        temp_dir, session = cluster.temp_dir, cluster.head.pid
    print(f"\nTIMING autoscaling: cluster start {cluster.timings['start_s']:.1f} s, "
          f"driver connect {info['connect_s']:.1f} s, GPU node launch to actor ready "
          f"{info['launch_s']:.1f} s, job total {job_s:.1f} s, scale-down after job end "
          f"{scale_down_s:.1f} s (idle timeout 6 s), teardown {cluster.timings['stop_s']:.1f} s")
    assert not find_cluster_processes(temp_dir, session)
    assert not Path(temp_dir).exists()
    assert _address_file() == before


HOLD_JOB = r"""
import json, os
import ray

ray.init(log_to_driver=False)


@ray.remote(num_cpus=1)
class Holder:
    def where(self):
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}


holder = Holder.options(name="holder", lifetime="detached").remote()
print("RESULT " + json.dumps(ray.get(holder.where.remote(), timeout=60)), flush=True)
"""


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_autoscaling_teardown_ends_fake_nodes_and_their_workers():
    """Teardown with a fake node still up and a detached actor running on it: nothing of the
    cluster survives (processes found by session, temp dir in the command line, or marker)."""
    worker_types = {"cpu_worker": {"resources": {"CPU": 1}, "max_workers": 1}}
    with autoscaling_cluster(worker_types, idle_timeout_s=120) as cluster:
        rc, out, err = run_job_subprocess(["-c", HOLD_JOB], cluster.env(), timeout=90)
        assert rc == 0, f"{err[-3000:]}\n{cluster.diagnostics()}"
        holder = _result(out)
        (node,) = cluster.wait_for_workers(1, timeout=10, node_type="cpu_worker")
        assert node["node_id"] == holder["node_id"]

        procs = cluster.processes()
        by_pid = {p.pid: p for p in procs}
        assert holder["pid"] in by_pid, "the actor's worker process is not found as ours"
        fake_raylets = [p for p in procs
                        if "/raylet/raylet " in p.cmdline and node["node_id"] in p.cmdline]
        assert len(fake_raylets) == 1, [p.cmdline[:120] for p in procs]
        # The fake node was started by the autoscaler inside the head's session (and process
        # group); the actor's worker sits in its own process group but the same session.
        head_pid = cluster.head.pid
        assert fake_raylets[0].sid == head_pid and fake_raylets[0].pgid == head_pid
        assert by_pid[holder["pid"]].sid == head_pid
        assert all(p.sid == head_pid for p in procs), [(p.pid, p.sid, p.cmdline[:80])
                                                       for p in procs if p.sid != head_pid]
        pids = sorted(by_pid)
        temp_dir = cluster.temp_dir
    swept = [(p.pid, p.cmdline[:110]) for p in cluster.teardown_killed]
    print(f"\nTIMING teardown: {len(pids)} processes, graceful stop "
          f"{cluster.timings['stop_graceful_s']:.1f} s, total {cluster.timings['stop_s']:.1f} s;"
          f" SIGKILLed by the sweep: {swept}")
    assert not cluster.teardown_survivors
    assert all(_gone(pid) for pid in pids), [pid for pid in pids if not _gone(pid)]
    assert not find_cluster_processes(temp_dir, head_pid)
    assert not Path(temp_dir).exists()


TASK_PER_NODE_JOB = r"""
import json, os
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(log_to_driver=False)


@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()


nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
refs = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
        for n in nodes]
print("RESULT " + json.dumps({"nodes": nodes, "ran_on": ray.get(refs, timeout=60)}), flush=True)
"""


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_multi_node_cluster_runs_a_task_per_node_and_loses_a_removed_worker():
    before = _address_file()
    sigterm_before = signal.getsignal(signal.SIGTERM)
    with multi_node_cluster(n_workers=2, cpus_per_worker=1, gpus_per_worker=1) as mc:
        nodes = mc.alive_nodes()
        assert len(nodes) == 3 and nodes[0]["is_head"], nodes
        assert all(n["ip"] == "127.0.0.1" for n in nodes)
        assert nodes[0]["resources"].get("CPU", 0) == 0
        worker_ids = {w.node_id for w in mc.workers}
        assert {n["node_id"] for n in nodes[1:]} == worker_ids
        assert all(n["resources"]["CPU"] == 1 and n["resources"]["GPU"] == 1 for n in nodes[1:])
        assert "GPU" not in nodes[0]["resources"]

        t0 = time.monotonic()
        rc, out, err = run_job_subprocess(["-c", TASK_PER_NODE_JOB], mc.env(), timeout=90)
        job_s = time.monotonic() - t0
        assert rc == 0, err[-3000:]
        result = _result(out)
        assert sorted(result["ran_on"]) == sorted(result["nodes"]) == sorted(worker_ids)

        victim = mc.workers[0]
        t1 = time.monotonic()
        mc.remove_worker(victim)
        after = mc.wait_for(lambda: (lambda ns: ns if len(ns) == 2 else None)(mc.alive_nodes()),
                            timeout=30, what="2 alive nodes")
        remove_s = time.monotonic() - t1
        assert victim.node_id not in {n["node_id"] for n in after}
        assert [w.node_id for w in mc.workers] == [n["node_id"] for n in after[1:]]
        temp_dir, pids = mc.temp_dir, [p.pid for p in mc.processes()]
        assert pids
    print(f"\nTIMING multi-node: head {mc.timings['head_start_s']:.1f} s, 2 workers "
          f"{mc.timings['workers_start_s']:.1f} s, task-per-node job {job_s:.1f} s, "
          f"remove_worker to gone {remove_s:.2f} s, teardown {mc.timings['stop_s']:.1f} s, "
          f"SIGKILLed by the sweep: {[(p.pid, p.cmdline[:110]) for p in mc.teardown_killed]}")
    assert not mc.teardown_survivors
    assert all(_gone(pid) for pid in pids), [pid for pid in pids if not _gone(pid)]
    assert not find_cluster_processes(temp_dir)
    assert not Path(temp_dir).exists()
    assert _address_file() == before  # Cluster's /tmp/ray/ray_current_cluster kept away
    assert signal.getsignal(signal.SIGTERM) is sigterm_before  # Cluster's handler undone


def test_run_job_subprocess_kills_its_process_group_on_timeout():
    code = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print(child.pid, flush=True); time.sleep(120)")
    t0 = time.monotonic()
    with pytest.raises(JobTimeout) as exc:
        run_job_subprocess(["python", "-c", code], dict(os.environ), timeout=3)
    assert time.monotonic() - t0 < 15
    child = int(exc.value.output.split()[0])
    deadline = time.monotonic() + 5
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child), "the job's child outlived the timeout"


def test_run_job_subprocess_returns_code_and_output():
    rc, out, err = run_job_subprocess(
        ["-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
        dict(os.environ), timeout=30)
    assert (rc, out.strip(), err.strip()) == (3, "out", "err")


def test_job_env_points_at_the_cluster_on_loopback():
    from cluster_sim import REPO_ROOT, TESTS_DIR, job_env

    env = job_env("127.0.0.1:1234")
    assert env["RAY_ADDRESS"] == "127.0.0.1:1234"
    assert env["RAY_AUTH_MODE"] == "disabled"
    assert env["RAY_NODE_IP_ADDRESS"] == "127.0.0.1"
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(REPO_ROOT), str(TESTS_DIR)]
