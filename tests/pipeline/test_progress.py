"""Progress lines (ray_app/pipeline/progress.py): work done, rate from the first result, time left."""

from __future__ import annotations

import io
import logging

from ray_app.pipeline import progress
from ray_app.pipeline.progress import Progress


def test_progress_lines_measure_the_rate_after_the_first_result(monkeypatch, caplog):
    clock = iter([0.0, 100.0, 110.0, 120.0, 121.0, 125.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = Progress(1000, "pairs", every_s=5, stream=io.StringIO())  # t=0 (not a terminal)
    with caplog.at_level(logging.INFO, logger="ray_app.pipeline.progress"):
        bar.update(100)  # t=100: the model took 100 s to load: no rate from that
        bar.update(100)  # t=110: 100 pairs in 10 s
        bar.update(0)  # t=120
        bar.update(800)  # t=121: too soon after the last line for one of its own
        bar.close()  # t=125: so the last line comes at the end
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == ("100/1,000 pairs (10.0%), at most about 15 min left (rate from the "
                        "first results, model loading included)")
    assert lines[1] == "200/1,000 pairs (20.0%), 10.00 pairs/s, about 80 s left"
    assert lines[2] == "200/1,000 pairs (20.0%), 5.00 pairs/s, about 3 min left"
    assert lines[3:] == ["1,000/1,000 pairs (100.0%) in 2 min"]


def test_waiting_line_and_durations():
    bar = Progress(10, "pairs", stream=io.StringIO())
    assert bar.line().startswith("0/10 pairs: waiting for the first results")
    assert progress._duration(4000) == "67 min" and progress._duration(9000) == "2.5 h"
