"""One way for every job to start or join Ray, quietly.

A job's user needs its own progress and errors, not Ray's operator tables, start-up INFO lines
or its notice that token authentication is on (it stays on for a local Ray a job starts; the
token is in ~/.ray/auth_token): those stay in Ray's log files (/tmp/ray/session_latest/logs).
Warnings and errors from Ray still reach the user.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import warnings

_LEVELS = {
    "ray": logging.WARNING,
    "ray.data": logging.WARNING,
    "ray.data._internal.progress": logging.ERROR,  # "progress bars disabled"
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    # Its hanging-task detector takes a slow model's batch (minutes on a CPU) for a hung task.
    "ray.data._internal.issue_detection": logging.ERROR,
}

# Lines Ray's C++ core worker writes straight to the driver's stderr that say nothing a user
# can act on. Ray Data hands every actor of a pool its map function through the object store,
# so any pool with restarts (ours: the engine restarts) gets this error-level notice.
_NATIVE_NOISE = re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor "
                           rb"arguments in the object store and max_restarts > 0")


# Ray Data's own report of a failed task: the job's one-line message names the root cause
# (ray_app/pipeline/cli.py), and --debug (RAY_APP_DEBUG=1) shows these with the traceback.
_FAILURE_LOGGERS = ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state")
DEBUG_ENV = "RAY_APP_DEBUG"


def quiet_ray() -> None:
    import ray.data  # it configures its loggers when imported: set the levels after that

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name, level in _LEVELS.items():
        logging.getLogger(name).setLevel(level)
    if os.environ.get(DEBUG_ENV) != "1":
        for name in _FAILURE_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # Actor fault tolerance is set through map_batches' remote arguments, which Ray 2.60 has
    # deprecated without a named replacement for max_restarts.
    warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (`ray job submit` sets it), or start a local Ray."""
    import ray

    quiet_ray()
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, logging_level=logging.WARNING)


def filter_native_stderr(noise: re.Pattern[bytes] = _NATIVE_NOISE) -> None:
    """Drop Ray's C++ notices that `noise` matches from this process's stderr (file descriptor
    2, which the C++ logger writes to directly; Python's logging cannot reach it). Everything
    else passes through in order; at exit the pipe is drained, so a job's last line is never
    lost. For job entry points only: a test runner captures file descriptor 2 itself."""
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                if not noise.search(line):
                    os.write(original, line)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the thread reads to its end
        thread.join(timeout=5)

    atexit.register(restore)
