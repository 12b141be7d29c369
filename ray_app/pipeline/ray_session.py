"""One way for every job to start or join Ray, quietly.

A job's user needs its own progress and errors, not Ray's operator tables, start-up INFO lines
or its notice that token authentication is on (it stays on for a local Ray a job starts; the
token is in ~/.ray/auth_token): those stay in Ray's log files (/tmp/ray/session_latest/logs).
Warnings and errors from Ray still reach the user.
"""

from __future__ import annotations

import logging
import os
import warnings

_LEVELS = {
    "ray": logging.WARNING,
    "ray.data": logging.WARNING,
    "ray.data._internal.progress": logging.ERROR,  # "progress bars disabled"
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
}


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
