"""What made a label: recorded in every output row so each label can be traced."""

from __future__ import annotations

import functools
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import ray_app

# Beside a fine-tuned adapter's weights: what it was trained on (ray_app.finetune.ray_job).
ADAPTER_PROVENANCE = "training_provenance.json"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version, plus the git commit when running from a checkout ('+dirty' if edited)."""
    root = Path(ray_app.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ray_app.__version__
    return f"{ray_app.__version__}+g{commit}{'.dirty' if dirty else ''}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
