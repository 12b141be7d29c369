"""Evaluate labelling runs side by side against hand labels: AUROC, EER, balanced accuracy, F1,
sensitivity and specificity with seeded bootstrap 95% intervals, per condition and level, as a
Markdown report with ROC, histogram and reliability plots.

    python jobs/evaluate.py --truth truth.csv --out eval/ \
        --run qwen-direct=out/qwen_direct --run qwen-summary=out/qwen_summary --run rules=out/rules
    ray job submit --working-dir . -- python jobs/evaluate.py --truth truth.csv --out eval/ \
        --run direct=s3://bucket/labels/direct --run rules=s3://bucket/labels/rules

Each run's threshold is its EER threshold on a seeded calibration part of the hand-labelled
reports (--calibration-fraction), or a stored calibration (--calibration NAME=FILE); every run is
measured on the same remaining reports.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path

from ray_app.evaluation.calibration import Calibration
from ray_app.evaluation.report import write_report
from ray_app.evaluation.review import load_truth
from ray_app.evaluation.runs import (
    EvaluationConfig,
    Run,
    evaluate_runs,
    scored_rows,
    split_reports,
)
from ray_app.labelling.few_shot import drop_example_reports, recorded_examples
from ray_app.pipeline.cli import run_job
from ray_app.pipeline.report_tables import read_label_rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=PATH",
                        help="a labelling job's output folder under a name; repeat per run")
    parser.add_argument("--truth", nargs="+", required=True, help="hand-label CSV file(s)")
    parser.add_argument("--out", required=True, help="folder for report.md, metrics.csv, plots/")
    parser.add_argument("--calibration", action="append", default=[], metavar="NAME=FILE",
                        help="use a stored calibration's thresholds for run NAME")
    parser.add_argument("--conditions", nargs="*", default=None, help="only these conditions")
    parser.add_argument("--s3-endpoint", default=None)
    for f in fields(EvaluationConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default),
                            default=f.default, help=f.metadata["doc"])
    return parser.parse_args(argv)


def named(pairs: list[str], what: str) -> dict[str, str]:
    parsed = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{what} {pair!r}: expected NAME=PATH")  # ray_app.pipeline.cli: exit 2
        parsed[name] = value
    return parsed


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    cfg = EvaluationConfig(**{f.name: getattr(args, f.name) for f in fields(EvaluationConfig)})
    run_paths, calibration_paths = named(args.run, "--run"), named(args.calibration, "--calibration")
    truth = load_truth(args.truth)
    if args.conditions:
        truth = truth[truth["condition"].isin(args.conditions)]
    # Reports any run showed as few-shot examples are left out of both parts for every run:
    # no threshold is chosen, and no metric measured, on them, and the runs share their reports.
    truth = drop_example_reports(truth, recorded_examples(list(run_paths.values()),
                                                          args.s3_endpoint), "the evaluation")
    calibrations = {n: Calibration.load(p) for n, p in calibration_paths.items()}
    runs = [Run(name, read_label_rows(path, args.s3_endpoint), calibrations.get(name))
            for name, path in run_paths.items()]
    metrics = evaluate_runs(runs, truth, cfg)
    calibration_ids, evaluation_ids = split_reports(truth, cfg.calibration_fraction, cfg.seed)
    scored = {run.name: scored_rows(run, truth, evaluation_ids) for run in runs}
    header = [f"Hand labels: {truth['report_id'].nunique()} reports, "
              f"{len(truth)} (report, condition, level) labels. Thresholds from "
              f"{len(calibration_ids)} calibration reports (seed {cfg.seed}) unless a stored "
              f"calibration is named; metrics on the other {len(evaluation_ids)}. "
              f"{cfg.bootstrap} stratified bootstrap resamples, {cfg.confidence:.0%} intervals."]
    path = write_report(metrics, runs, scored, Path(args.out), header)
    print(path.read_text())


if __name__ == "__main__":
    run_job(main)
