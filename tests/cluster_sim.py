"""Simulated multi-node Ray clusters on one machine, for tests.

Two kinds of cluster, both on loopback only, each in its own short temp dir, each torn down by
ending only the processes it started:

* ``autoscaling_cluster(worker_types, ...)``: a ``ray start --head`` with the ``fake_multinode``
  autoscaler provider. The autoscaler launches fake worker nodes (raylets on this machine) when
  tasks or actors ask for resources the cluster lacks (e.g. ``num_gpus=1``) and removes them once
  they have been idle for ``idle_timeout_s``.
* ``multi_node_cluster(n_workers, cpus_per_worker, ...)``: a fixed set of nodes started in this
  process with ``ray.cluster_utils.Cluster``; ``remove_worker(node)`` takes one away.

Jobs run as separate processes (``run_job_subprocess``) with ``cluster.env()``; the test process
itself never calls ``ray.init`` on these clusters, so they do not interfere with the local Ray of
other tests in the same pytest process. Cluster state is read with a GCS client from outside.

Measured facts behind the choices here (Ray 2.60, 2 CPU cores):

* ``ray start --node-ip-address=127.0.0.1`` is rewritten to the machine's network address
  (``resolve_ip_for_localhost``), and ``RAY_NODE_IP_ADDRESS`` is read nowhere in Ray 2.60. What
  keeps a simulated cluster on loopback is ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: with it, Ray's
  ``get_node_ip_address()`` answers 127.0.0.1, so the head, the fake worker nodes started by the
  autoscaler, and the drivers of jobs all use 127.0.0.1 and the GCS listens on 127.0.0.1 only. A
  driver *without* it rewrites ``RAY_ADDRESS=127.0.0.1:PORT`` to the network address and hangs, so
  ``env()`` sets it.
* Worker processes (``ray::IDLE``, actors) put themselves in their own process group: killing the
  head's process group does not reach them. Everything started under the head stays in the head's
  *session* (``start_new_session=True``), so teardown sweeps the session, plus any process whose
  command line holds the temp dir or whose environment holds the ``RAY_APP_SIM_CLUSTER`` marker.
* SIGTERM to the whole group kills the GCS first while ``ray start`` tries to drain the node through
  it (a 30 s stall): teardown sends SIGTERM to the ``ray start`` process alone (drain disabled with
  ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0``; ~4 s), then SIGKILLs what is left. Something always
  is when a fake node is up: ``ray start`` stops only what it started, and the fake nodes (raylet,
  log monitor, agents, workers) are Node objects of the autoscaler process, which nobody stops.
* A watchdog process per cluster tears the cluster down if the test process dies without doing
  so (see ``_WATCHDOG``).
* ``Cluster.add_node`` writes, and ``Cluster.shutdown`` deletes, ``/tmp/ray/ray_current_cluster``:
  a plain ``ray.init()`` anywhere on the machine connects to the cluster named there. The harness
  suppresses both, and restores the SIGTERM handler that ``Cluster`` installs in this process.
* ``idle_timeout_minutes`` accepts fractions: 0.1 removes an idle fake node after ~6 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def tests_on_path() -> list[str]:
    """tests/ and its subfolders: a Ray worker imports engines defined in test modules by their
    module name (pytest puts each test module's own folder on the path, so workers need them all)."""
    return [str(TESTS_DIR), *sorted(str(p) for p in TESTS_DIR.iterdir()
                                     if p.is_dir() and not p.name.startswith(("_", ".")))]

#: Environment variable set to the cluster's temp dir in every process of a simulated cluster
#: that Ray starts from an environment we control; teardown uses it to find stragglers.
MARKER_ENV = "RAY_APP_SIM_CLUSTER"

HEAD_NODE_TYPE = "ray.head.default"
DEFAULT_OBJECT_STORE_BYTES = 150 * 1024 * 1024


class ClusterStartError(RuntimeError):
    """The simulated cluster did not come up; the message carries the tail of its logs."""


class JobTimeout(subprocess.TimeoutExpired):
    """``run_job_subprocess`` ran past its timeout; its process group was killed."""

    def __str__(self) -> str:
        err = self.stderr or ""
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        return f"{super().__str__()}\n--- stderr tail ---\n{err[-3000:]}"


# --------------------------------------------------------------------------------------------
# Small helpers


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (a race with other users is possible but rare)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_temp_dir() -> str:
    """A new short temp dir (Ray's Unix socket paths are limited to ~107 characters)."""
    return tempfile.mkdtemp(prefix="rs", dir="/tmp")


def python_path() -> str:
    """PYTHONPATH for jobs and workers: the repo root, tests/, then the inherited one."""
    parts = [str(REPO_ROOT), *tests_on_path(), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def job_env(address: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a driver process (``python jobs/...``) that connects to ``address``."""
    env = dict(os.environ)
    env.update(
        RAY_ADDRESS=address,
        RAY_AUTH_MODE="disabled",
        # Kept for the convention of this repo; Ray 2.60 itself does not read it ...
        RAY_NODE_IP_ADDRESS="127.0.0.1",
        # ... this is what keeps the driver on 127.0.0.1 (see the module docstring).
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=python_path(),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.5,
             what: str = "condition") -> Any:
    """Call ``predicate`` until it returns something truthy and return that; raise
    ``TimeoutError`` after ``timeout`` seconds. Exceptions from the predicate count as "not
    yet" (the last one is chained to the TimeoutError)."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_value: Any = None
    while True:
        try:
            last_value = predicate()
            if last_value:
                return last_value
            last_exc = None
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_exc = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s "
                               f"(last value: {last_value!r})") from last_exc
        time.sleep(interval)


def _tail(path: Path | str, n_chars: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n_chars))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    pgid: int
    sid: int
    state: str
    start_ticks: int  # start time since boot, in clock ticks: tells a reused pid apart
    cmdline: str


def _read_proc(pid: int) -> tuple[ProcInfo, bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            environ = b""
    except (OSError, ValueError):
        return None  # gone, or not ours to read
    # The command name in parentheses may hold spaces: split after the last ')'.
    rest = stat[stat.rindex(")") + 2:].split()
    info = ProcInfo(pid=pid, state=rest[0], pgid=int(rest[2]), sid=int(rest[3]),
                    start_ticks=int(rest[19]), cmdline=cmdline)
    return info, environ


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            pid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            break
    return pids


def process_start_ticks(pid: int) -> int | None:
    read = _read_proc(pid)
    return None if read is None else read[0].start_ticks


def find_cluster_processes(temp_dir: str, session_id: int | None = None,
                           pids: dict[int, int] | None = None) -> list[ProcInfo]:
    """Live (non-zombie) processes of a simulated cluster: those in session ``session_id``,
    those whose command line holds ``temp_dir``, those whose environment holds
    ``RAY_APP_SIM_CLUSTER=<temp_dir>``, and those in ``pids`` ({pid: start ticks}, so that a
    reused pid is not taken for ours). Never this process or its ancestors."""
    marker = f"{MARKER_ENV}={temp_dir}\0".encode()
    skip = _ancestors()
    wanted = pids or {}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        pid = int(entry)
        read = _read_proc(pid)
        if read is None:
            continue
        info, environ = read
        if info.state in ("Z", "X"):
            continue
        in_session = session_id is not None and info.sid == session_id
        if (in_session or wanted.get(pid) == info.start_ticks or temp_dir in info.cmdline
                or marker in environ):
            found.append(info)
    return found


def _kill_all(procs: Sequence[ProcInfo], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p.pid, sig)


def sweep_processes(temp_dir: str, session_id: int | None = None,
                    pids: dict[int, int] | None = None,
                    timeout: float = 15.0) -> tuple[list[ProcInfo], list[ProcInfo]]:
    """SIGKILL every process ``find_cluster_processes`` names until none is left.
    Returns (the processes that had to be killed, those still alive at the deadline)."""
    killed: dict[int, ProcInfo] = {}
    deadline = time.monotonic() + timeout
    while True:
        procs = find_cluster_processes(temp_dir, session_id, pids)
        if not procs or time.monotonic() >= deadline:
            return list(killed.values()), procs
        for p in procs:
            killed.setdefault(p.pid, p)
        _kill_all(procs, signal.SIGKILL)
        time.sleep(0.2)


# Started with each cluster: if the test process dies without tearing the cluster down
# (SIGKILL, a CI timeout), it stops the head and sweeps the cluster's processes. Measured without
# it, after a SIGKILL of the test process: the autoscaling head lives on in its own session (and
# even when a parent-death signal stopped it, the fake nodes' raylets lingered 60 s until they gave
# up on the GCS, and their log monitor and agents stayed for good); with Cluster, Ray's own
# parent-death signal ends the node processes but the worker nodes' dashboard and runtime-env
# agents stayed for good. A normal teardown ends the watchdog first, with SIGTERM.
_WATCHDOG = r"""
import os, shutil, signal, sys, time
parent, head, tests_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
temp_dir = os.environ["RAY_APP_SIM_WATCHDOG_DIR"]
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
while os.getppid() == parent:
    time.sleep(1)
sys.path.insert(0, tests_dir)
from cluster_sim import sweep_processes
if head:
    try:
        os.kill(head, signal.SIGTERM)
        time.sleep(5)
    except ProcessLookupError:
        pass
sweep_processes(temp_dir, head or None)
shutil.rmtree(temp_dir, ignore_errors=True)
"""


def _start_watchdog(temp_dir: str, head_pid: int = 0) -> subprocess.Popen:
    # The temp dir travels in its own variable, not on the command line: the watchdog must not
    # look like a process of the cluster it guards.
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(head_pid), str(TESTS_DIR)],
        env=dict(os.environ, RAY_APP_SIM_WATCHDOG_DIR=temp_dir), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _end_watchdog(watchdog: subprocess.Popen | None) -> None:
    if watchdog is not None and watchdog.poll() is None:
        watchdog.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(5)


# --------------------------------------------------------------------------------------------
# Jobs


def run_job_subprocess(args: Sequence[str] | str, env: dict[str, str], timeout: float,
                       cwd: str | Path | None = None) -> tuple[int, str, str]:
    """Run a Python job against a cluster and return (returncode, stdout, stderr).

    ``args`` are the interpreter's arguments (``["jobs/label_reports.py", "--x", "1"]`` or
    ``["-c", code]``); a leading ``"python"``/``"python3"`` is accepted and replaced by this
    interpreter. Runs in ``cwd`` (default: the repo root) in its own session; past ``timeout``
    seconds its process group gets SIGTERM, then SIGKILL 5 s later, and ``JobTimeout`` (a
    ``subprocess.TimeoutExpired`` carrying the output so far) is raised."""
    argv = shlex.split(args) if isinstance(args, str) else list(args)
    if argv and argv[0] in ("python", "python3", sys.executable):
        argv = argv[1:]
    cmd = [sys.executable, *argv]
    proc = subprocess.Popen(cmd, env=env, cwd=str(cwd or REPO_ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                out, err = proc.communicate(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        else:  # something outside the group holds the pipes open: give up on the output
            proc.kill()
            out, err = "", ""
            for stream in (proc.stdout, proc.stderr):
                with contextlib.suppress(Exception):
                    stream.close()
            proc.wait(5)
        raise JobTimeout(cmd, timeout, output=out, stderr=err) from None
    finally:
        if proc.poll() is None:  # an exception other than the timeout (e.g. pytest-timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.communicate(timeout=5)


# --------------------------------------------------------------------------------------------
# Cluster state through the GCS


class _SimClusterBase:
    address: str
    temp_dir: str

    def __init__(self) -> None:
        self._gcs_client = None
        self.timings: dict[str, float] = {}
        self.teardown_killed: list[ProcInfo] = []
        self.teardown_survivors: list[ProcInfo] = []

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a job subprocess: RAY_ADDRESS=<address>, RAY_AUTH_MODE=disabled,
        RAY_NODE_IP_ADDRESS=127.0.0.1, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
        RAY_USAGE_STATS_ENABLED=0, PYTHONUNBUFFERED=1 and PYTHONPATH=<repo>:<repo>/tests:...,
        on top of this process's environment; ``extra`` overrides."""
        return job_env(self.address, extra)

    def _gcs(self):
        if self._gcs_client is None:
            # Only once the port answers: a GcsClient for an address nobody listens on blocks
            # for ~40 s in its constructor.
            host, port = self.address.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=2):
                pass
            from ray._raylet import GcsClient

            self._gcs_client = GcsClient(address=self.address)
        return self._gcs_client

    def alive_nodes(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The cluster's alive nodes, head first, as dicts: node_id (hex), ip, is_head,
        node_type (the autoscaler's type name, '' for Cluster nodes), resources (total: CPU, GPU,
        memory, object_store_memory, node:<ip>, ...)."""
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        infos = self._gcs().get_all_node_info(timeout=timeout,
                                              state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
        nodes = [{
            "node_id": info.node_id.hex(),
            "ip": info.node_manager_address,
            "is_head": bool(info.is_head_node),
            "node_type": info.node_type_name,
            "resources": dict(info.resources_total),
        } for info in infos.values()]
        return sorted(nodes, key=lambda n: (not n["is_head"], n["node_id"]))

    def worker_nodes(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        return [n for n in self.alive_nodes(timeout) if not n["is_head"]]

    def wait_for(self, predicate: Callable[[], Any], timeout: float, interval: float = 0.5,
                 what: str = "condition") -> Any:
        return wait_for(predicate, timeout, interval, what)

    def wait_for_workers(self, count: int, timeout: float, **match: Any) -> list[dict]:
        """Wait until exactly ``count`` alive worker (non-head) nodes match ``match`` (keys of
        the node dicts, e.g. node_type="gpu_worker"); returns them."""
        def check():
            nodes = [n for n in self.worker_nodes()
                     if all(n.get(k) == v for k, v in match.items())]
            return (nodes,) if len(nodes) == count else None  # truthy even for count=0
        return wait_for(check, timeout, what=f"{count} worker node(s) {match or ''}")[0]

    def _close_gcs(self) -> None:
        self._gcs_client = None


# --------------------------------------------------------------------------------------------
# Autoscaling cluster (fake_multinode provider)


def _node_types(worker_types: dict[str, dict], object_store_bytes: int) -> dict[str, dict]:
    types: dict[str, dict] = {
        HEAD_NODE_TYPE: {"resources": {"CPU": 0}, "max_workers": 0, "node_config": {}},
    }
    for name, spec in worker_types.items():
        if name == HEAD_NODE_TYPE:
            raise ValueError(f"{HEAD_NODE_TYPE} is the head's type")
        resources = dict(spec["resources"])
        resources.setdefault("object_store_memory", object_store_bytes)
        types[name] = {
            "resources": resources,
            "min_workers": int(spec.get("min_workers", 0)),
            "max_workers": int(spec.get("max_workers", 1)),
            "node_config": dict(spec.get("node_config", {})),
        }
    return types


def autoscaler_config(port: int, worker_types: dict[str, dict], idle_timeout_s: float,
                      max_workers: int | None = None, upscaling_speed: float = 1.0,
                      object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES) -> dict:
    """The fake_multinode cluster config (the keys of Ray's fake_multi_node example.yaml, which
    the wheel does not ship)."""
    types = _node_types(worker_types, object_store_bytes)
    if max_workers is None:
        max_workers = sum(t["max_workers"] for t in types.values())
    return {
        "cluster_name": f"sim-{port}",
        "max_workers": int(max_workers),
        "upscaling_speed": float(upscaling_speed),
        "idle_timeout_minutes": idle_timeout_s / 60.0,  # fractions work (autoscaler v1)
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Without it the provider starts nodes against port 6379 of the network address.
            "gcs_address": f"127.0.0.1:{port}",
        },
        "available_node_types": types,
        "head_node_type": HEAD_NODE_TYPE,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class AutoscalingSimCluster(_SimClusterBase):
    """A running fake_multinode cluster (see ``autoscaling_cluster``)."""

    def __init__(self, temp_dir: str, config: dict, start_timeout: float,
                 object_store_bytes: int) -> None:
        super().__init__()
        self.temp_dir = temp_dir
        self.config = config
        self.config_path = Path(temp_dir) / "autoscaler.json"
        self.head_log = Path(temp_dir) / "head.log"
        self.port = 0
        self.address = ""
        self.head: subprocess.Popen | None = None
        self._watchdogs: list[subprocess.Popen] = []
        self._stopped = False
        self._start_timeout = start_timeout
        self._object_store_bytes = object_store_bytes

    # -- start
    def _head_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env.update(
            RAY_FAKE_CLUSTER="1",
            AUTOSCALER_UPDATE_INTERVAL_S="1",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # head and fake nodes on 127.0.0.1
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM: stop at once, no 30 s drain
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONPATH=python_path(),  # workers inherit the raylet's environment
            **{MARKER_ENV: self.temp_dir},
        )
        return env

    def _start_once(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config["provider"]["gcs_address"] = self.address
        self.config["cluster_name"] = f"sim-{self.port}"
        self.config_path.write_text(json.dumps(self.config, indent=1))
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head",  # = `ray start`
            f"--port={self.port}", "--node-ip-address=127.0.0.1", "--num-cpus=0", "--num-gpus=0",
            f"--temp-dir={self.temp_dir}", f"--autoscaling-config={self.config_path}",
            f"--object-store-memory={self._object_store_bytes}",
            "--include-dashboard=false", "--disable-usage-stats", "--block",
            # Explicit free ports: the defaults (10001, 52365, ...) may be taken by other Rays.
            f"--dashboard-port={free_port()}",  # the minimal dashboard binds it all the same
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]
        with open(self.head_log, "ab") as log:
            self.head = subprocess.Popen(cmd, env=self._head_env(), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.temp_dir, start_new_session=True)
        self._watchdogs.append(_start_watchdog(self.temp_dir, self.head.pid))

        def head_alive():
            if self.head.poll() is not None:
                raise ClusterStartError(f"ray start exited with {self.head.returncode}")
            return any(n["is_head"] for n in self.alive_nodes(timeout=5))

        deadline = time.monotonic() + self._start_timeout
        while True:
            try:
                if head_alive():
                    return
            except ClusterStartError:
                raise
            except Exception:  # noqa: BLE001 - port not open yet, GCS still starting
                pass
            if time.monotonic() >= deadline:
                raise ClusterStartError(f"head not up within {self._start_timeout:.0f} s")
            time.sleep(0.5)

    def start(self) -> None:
        t0 = time.monotonic()
        for attempt in (1, 2):
            try:
                self._start_once()
                break
            except ClusterStartError as exc:
                log = self.diagnostics()
                self.stop()
                if attempt == 2 or "exited" not in str(exc):  # retry a lost port race only
                    raise ClusterStartError(f"{exc}\n{log}") from None
                self._stopped = False
        self.timings["start_s"] = time.monotonic() - t0

    # -- diagnostics
    def session_logs_dir(self) -> Path:
        return Path(self.temp_dir) / "session_latest" / "logs"

    def diagnostics(self, n_chars: int = 2500) -> str:
        logs = self.session_logs_dir()
        parts = [f"--- {self.head_log} ---\n{_tail(self.head_log, n_chars)}"]
        for name in ("monitor.log", "monitor.err"):
            parts.append(f"--- {name} ---\n{_tail(logs / name, n_chars)}")
        return "\n".join(parts)

    def processes(self) -> list[ProcInfo]:
        """The cluster's live processes (session of the head, temp dir, marker)."""
        sid = self.head.pid if self.head is not None else None
        return find_cluster_processes(self.temp_dir, sid)

    # -- stop
    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM to ``ray start`` (it stops the processes it started), then SIGKILL to every
        process left in the head's session or carrying the temp dir / marker: the fake worker
        nodes, which the autoscaler started and nobody stops, and workers that outlive their
        raylet. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        for watchdog in self._watchdogs:
            _end_watchdog(watchdog)
        self._close_gcs()
        head = self.head
        if head is not None and head.poll() is None:
            # SIGTERM to `ray start` alone: it stops the processes it started. (SIGTERM to the
            # whole group kills the GCS under it first.)
            with contextlib.suppress(ProcessLookupError):
                head.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                head.wait(grace)
        self.timings["stop_graceful_s"] = time.monotonic() - t0
        # The fake worker nodes are the autoscaler's Node objects: nobody stops them but us.
        sid = head.pid if head is not None else None
        self.teardown_killed, self.teardown_survivors = sweep_processes(self.temp_dir, sid)
        if head is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                head.wait(5)
        self.timings["stop_s"] = time.monotonic() - t0
        if self.teardown_survivors:
            warnings.warn(f"simulated cluster {self.temp_dir}: processes survived SIGKILL: "
                          f"{[(p.pid, p.cmdline[:80]) for p in self.teardown_survivors]}")


@contextlib.contextmanager
def autoscaling_cluster(worker_types: dict[str, dict], idle_timeout_s: float = 6.0,
                        max_workers: int | None = None, upscaling_speed: float = 1.0,
                        start_timeout: float = 90.0,
                        object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
                        keep_temp_dir: bool = False) -> Iterator[AutoscalingSimCluster]:
    """A 0-CPU head with the fake_multinode autoscaler; yields an ``AutoscalingSimCluster``.

    ``worker_types``: ``{"gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 2}}``
    (``min_workers`` defaults to 0, ``node_config`` to {}; each node gets an object store of
    ``object_store_bytes`` unless its resources name ``object_store_memory``). Idle worker nodes
    are removed after ``idle_timeout_s`` (fractions of a minute work). ``max_workers`` defaults to
    the sum over the worker types.

    Teardown ends the head and every process of the cluster (see ``AutoscalingSimCluster.stop``)
    and removes the temp dir unless ``keep_temp_dir``."""
    temp_dir = make_temp_dir()
    config = autoscaler_config(0, worker_types, idle_timeout_s, max_workers, upscaling_speed,
                               object_store_bytes)
    cluster = AutoscalingSimCluster(temp_dir, config, start_timeout, object_store_bytes)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if not keep_temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Fixed multi-node cluster (ray.cluster_utils.Cluster, in this process)


class MultiNodeSimCluster(_SimClusterBase):
    """A running ``ray.cluster_utils.Cluster`` (see ``multi_node_cluster``)."""

    def __init__(self, temp_dir: str) -> None:
        super().__init__()
        self.temp_dir = temp_dir
        self.cluster = None  # ray.cluster_utils.Cluster
        self.address = ""
        self.workers: list = []  # ray._private.node.Node, in the order added
        self._pids: dict[int, int] = {}  # pid -> start ticks of every process a Node started
        self._watchdog: subprocess.Popen | None = None
        self._stopped = False

    def _node_env(self) -> dict[str, str]:
        # Passed to each raylet (RayParams.env_vars); its workers and agents inherit it.
        return {MARKER_ENV: self.temp_dir, "PYTHONPATH": python_path(),
                "RAY_AUTH_MODE": "disabled"}

    def _record_pids(self, node) -> None:
        for infos in node.all_processes.values():
            for info in infos:
                ticks = process_start_ticks(info.process.pid)
                if ticks is not None:
                    self._pids[info.process.pid] = ticks

    @contextlib.contextmanager
    def _ray_global_side_effects_suppressed(self):
        """Cluster writes /tmp/ray/ray_current_cluster (a plain ray.init() anywhere on the
        machine then connects to this cluster) and installs a SIGTERM handler in this process;
        keep the first away and restore the second."""
        import ray._private.utils

        old_sigterm = signal.getsignal(signal.SIGTERM)
        original = ray._private.utils.write_ray_address
        ray._private.utils.write_ray_address = lambda *a, **k: None
        try:
            yield
        finally:
            ray._private.utils.write_ray_address = original
            if signal.getsignal(signal.SIGTERM) is not old_sigterm:
                signal.signal(signal.SIGTERM, old_sigterm)

    def start(self, n_workers: int, cpus_per_worker: float, gpus_per_worker: float,
              head_cpus: float, object_store_bytes: int, node_timeout: float) -> None:
        from ray.cluster_utils import Cluster

        t0 = time.monotonic()
        self._watchdog = _start_watchdog(self.temp_dir)
        self._object_store_bytes = object_store_bytes
        self._node_timeout = node_timeout
        with self._ray_global_side_effects_suppressed():
            self.cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
                "num_cpus": head_cpus, "num_gpus": 0, "node_ip_address": "127.0.0.1",
                "temp_dir": self.temp_dir, "include_dashboard": False,
                "dashboard_port": free_port(),  # bound even without the dashboard UI
                "dashboard_agent_listen_port": free_port(),  # default 52365 may be taken
                "object_store_memory": object_store_bytes, "env_vars": self._node_env(),
            })
        self.address = self.cluster.address
        self._record_pids(self.cluster.head_node)
        self.timings["head_start_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        for _ in range(n_workers):
            self.add_worker(cpus_per_worker, gpus_per_worker)
        self.wait_for(lambda: len(self.alive_nodes()) == 1 + n_workers, node_timeout,
                      what=f"{1 + n_workers} alive nodes")
        self.timings["workers_start_s"] = time.monotonic() - t1
        self.timings["start_s"] = time.monotonic() - t0

    def add_worker(self, num_cpus: float = 1, num_gpus: float = 0, **node_args):
        """Start one more worker node (waits until it is alive, up to the cluster's node
        timeout) and return its ``ray._private.node.Node`` (``.node_id`` is its hex id)."""
        args = {"num_cpus": num_cpus, "num_gpus": num_gpus, "node_ip_address": "127.0.0.1",
                "object_store_memory": self._object_store_bytes, "env_vars": self._node_env()}
        args.update(node_args)
        with self._ray_global_side_effects_suppressed():
            node = self.cluster.add_node(wait=False, **args)
        self._record_pids(node)
        self.workers.append(node)
        node_id = node.node_id
        self.wait_for(lambda: any(n["node_id"] == node_id for n in self.alive_nodes()),
                      self._node_timeout, what=f"worker node {node_id[:8]} alive")
        return node

    def remove_worker(self, node, allow_graceful: bool = True) -> None:
        """Kill one worker node's processes (``Cluster.remove_node``)."""
        self.cluster.remove_node(node, allow_graceful=allow_graceful)
        self.workers.remove(node)

    def processes(self) -> list[ProcInfo]:
        return find_cluster_processes(self.temp_dir, None, self._pids)

    def stop(self) -> None:
        """``Cluster.shutdown`` (each Node kills the processes it started), then SIGKILL to any
        process left that carries the temp dir or marker, or that a Node started. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        _end_watchdog(self._watchdog)
        self._close_gcs()
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            import ray
            import ray._common.utils
            import ray.experimental.internal_kv as internal_kv

            # Cluster.shutdown would delete /tmp/ray/ray_current_cluster (someone else's) and
            # reset this process's internal-kv client (a live ray.init here would lose it).
            patches = [(ray._common.utils, "reset_ray_address", lambda *a, **k: None)]
            if ray.is_initialized():
                patches.append((internal_kv, "_internal_kv_reset", lambda: None))
            saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
            try:
                for mod, name, fn in patches:
                    setattr(mod, name, fn)
                cluster.shutdown()  # kills each node's own processes (Node objects)
            except Exception as exc:  # noqa: BLE001 - the sweep below still runs
                warnings.warn(f"Cluster.shutdown failed: {exc!r}")
            finally:
                for mod, name, fn in saved:
                    setattr(mod, name, fn)
        self.timings["stop_graceful_s"] = time.monotonic() - t0
        self.teardown_killed, self.teardown_survivors = sweep_processes(
            self.temp_dir, None, self._pids)
        self.timings["stop_s"] = time.monotonic() - t0
        if self.teardown_survivors:
            warnings.warn(f"simulated cluster {self.temp_dir}: processes survived SIGKILL: "
                          f"{[(p.pid, p.cmdline[:80]) for p in self.teardown_survivors]}")


@contextlib.contextmanager
def multi_node_cluster(n_workers: int, cpus_per_worker: float, gpus_per_worker: float = 0,
                       head_cpus: float = 0, object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
                       node_timeout: float = 60.0,
                       keep_temp_dir: bool = False) -> Iterator[MultiNodeSimCluster]:
    """A head (``head_cpus`` CPUs, default 0) and ``n_workers`` worker nodes on 127.0.0.1,
    started in this process with ``ray.cluster_utils.Cluster``; yields a ``MultiNodeSimCluster``
    (``.cluster``, ``.address``, ``.env()``, ``.workers``, ``.add_worker()``,
    ``.remove_worker(node)``, ``.alive_nodes()``, ``.wait_for()``).

    Call it from the main thread: the node processes are tied to the thread that starts them
    (PR_SET_PDEATHSIG), so they die with this process but also with a helper thread."""
    temp_dir = make_temp_dir()
    cluster = MultiNodeSimCluster(temp_dir)
    try:
        cluster.start(n_workers, cpus_per_worker, gpus_per_worker, head_cpus,
                      object_store_bytes, node_timeout)
        yield cluster
    finally:
        cluster.stop()
        if not keep_temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
