"""What remembering scores saves: the same reports labelled with and without the labeller's
score cache (ray_app/labelling/score_cache.py), one loaded engine, in one run.

Asked sentence by sentence (`unit: sentence`, the chest findings' default), an archive repeats
its sentences from report to report ("No pneumothorax.", "The heart is normal in size."), and
each repeat is the same question. The label job's actors keep the scores of the questions they
have asked; this benchmark labels the reports in the job's batches (64 reports a call) with a
cache, and with `ScoreCache(0)`, which still asks a repeat within one batch once, and prints
seconds per report, the questions the engine computed, the speed-up and the largest score
difference (batch numerics: a remembered score was computed in another batch).

    python benchmarks/bench_score_cache.py --model qwen2.5-coder-1.5b-instruct \
        --dtype bfloat16 --reports 128
    python benchmarks/bench_score_cache.py --model smollm2-135m-instruct --reports 512

Reports: a seeded sample of the Open-i development CSV (`../shared/data/openi/reports_dev.csv`,
findings + impression) when present, else the package's sample spine reports (which repeat
whole reports: the figures then say little). The share of repeats grows with the archive
(Open-i: 35% of the sentences of 185 reports, 60% of 2,979), so a larger --reports shows a
larger saving.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from bench_conditions import OPENI, load_reports

from ray_app.engines import EngineConfig
from ray_app.engines.transformers_engine import TransformersEngine
from ray_app.labelling.conditions import load_conditions, with_unit
from ray_app.labelling.labeller import Labeller, ReportTask
from ray_app.labelling.prompts import conditions_prompt
from ray_app.labelling.score_cache import DEFAULT_ENTRIES, ScoreCache

log = logging.getLogger("bench_score_cache")
CHEST = ["atelectasis", "cardiomegaly", "fracture", "pleural_effusion"]
MODES = {"remembered": DEFAULT_ENTRIES, "per batch only": 0}


def label_in_batches(labeller: Labeller, tasks: list[ReportTask], batch: int) -> list[float]:
    scores = []
    for start in range(0, len(tasks), batch):
        scores.extend(row["score"] for row in labeller.label(tasks[start:start + batch]))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reports", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="reports per labeller call")
    parser.add_argument("--conditions", nargs="+", default=CHEST)
    parser.add_argument("--unit", choices=["report", "sentence"], default="sentence")
    parser.add_argument("--repeats", type=int, default=1, help="rounds, modes interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(OPENI), help="Open-i reports_dev.csv")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    tasks, source = load_reports(args.reports, args.seed, Path(args.data))
    conditions = [with_unit(c, args.unit) for c in load_conditions(args.conditions)]
    template = conditions_prompt(conditions)
    engine = TransformersEngine(EngineConfig(model=args.model, dtype=args.dtype))
    Labeller(engine, conditions, "direct", template).label(tasks[:2])  # warm-up, preamble

    seconds = {mode: float("inf") for mode in MODES}
    computed, scores = {}, {}
    for round_ in range(args.repeats):
        order = list(MODES) if round_ % 2 == 0 else list(reversed(MODES))
        for mode in order:
            labeller = Labeller(engine, conditions, "direct", template,
                                score_cache=ScoreCache(MODES[mode]))
            getattr(engine.formatter, "_rendered", {}).clear()  # no render kept from a round
            start = time.perf_counter()
            scores[mode] = label_in_batches(labeller, tasks, args.batch)
            elapsed = time.perf_counter() - start
            seconds[mode] = min(seconds[mode], elapsed)
            cache = labeller.score_cache
            computed[mode] = (cache.questions, cache.questions - cache.remembered)
            log.info("round %d, %s: %.3f s/report, %d of %d questions computed", round_ + 1,
                     mode, elapsed / len(tasks), computed[mode][1], computed[mode][0])

    n = len(tasks)
    diff = max(abs(a - b) for a, b in zip(*scores.values()))
    print(f"\nscore cache benchmark: {args.model}, {args.dtype}, {n} reports ({source}) x "
          f"{len(conditions)} conditions by {args.unit}, {args.batch} reports a call, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    for mode in MODES:
        asked, done = computed[mode]
        print(f"{mode:15s} {seconds[mode] / n:7.3f} s/report | {done:6d} of {asked} questions "
              f"computed ({done / asked:.0%})")
    ratio = seconds["per batch only"] / seconds["remembered"]
    print(f"speed-up {ratio:.2f}x | {len(scores['remembered'])} scores, max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
