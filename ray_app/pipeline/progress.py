"""What a user sees while a job runs: a progress bar on a terminal, a plain line every so often
in logs, with work done, rate and time left. No Ray here."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger(__name__)


class Progress:
    """Counts work done towards `total`. The rate is measured from the first finished piece, so
    that loading a model does not read as a rate of 0.0."""

    def __init__(self, total: int, unit: str, every_s: float = 30.0,
                 stream: TextIO | None = None):
        self.total, self.unit, self.every_s, self.done = max(total, 0), unit, every_s, 0
        stream = stream or sys.stderr
        self._bar = _bar(self.total, unit, stream) if stream.isatty() else None
        self._started = time.monotonic()
        self._first: float | None = None  # when the first piece came, and how much it was
        self._first_done = 0
        self._last_line = self._started
        self._last_logged_done = 0

    def update(self, n: int) -> None:
        now = time.monotonic()
        if self._first is None and n:
            self._first, self._first_done = now, n
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif now - self._last_line >= self.every_s:
            self._last_line, self._last_logged_done = now, self.done
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        now = now or time.monotonic()
        if self._first is None:
            return (f"0/{self.total:,} {self.unit}: waiting for the first results "
                    f"({now - self._started:.0f} s; workers are starting and loading the model)")
        since_first = self.done - self._first_done
        rate = since_first / (now - self._first) if since_first and now > self._first else 0.0
        share = 100 * self.done / self.total if self.total else 100.0
        done = f"{self.done:,}/{self.total:,} {self.unit} ({share:.1f}%)"
        if self.done >= self.total:
            return f"{done} in {_duration(now - self._started)}"
        if not rate:
            # One result so far (a small job on one worker may have only two): judge by the
            # time since the start, which counts starting workers and loading the model too.
            left = (self.total - self.done) * (now - self._started) / self.done
            return (f"{done}, at most about {_duration(left)} left (rate from the first results, "
                    "model loading included)")
        left = (self.total - self.done) / rate
        return f"{done}, {rate:.2f} {self.unit}/s, about {_duration(left)} left"

    def close(self) -> None:
        """Ends the bar; in logs, a last line when the last results came too soon after the
        previous line to get one of their own."""
        if self._bar is not None:
            self._bar.close()
        elif self.done and self._last_logged_done != self.done:
            log.info("%s", self.line())


def _bar(total: int, unit: str, stream: TextIO):
    from tqdm import tqdm

    return tqdm(total=total, unit=f" {unit}", file=stream, dynamic_ncols=True, smoothing=0.1)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "an unknown time"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
