"""Choose thresholds (and an uncertainty band) from labelling-job scores and hand labels, and
store them in a versioned calibration file.

    python jobs/calibrate.py --labels out/ --truth calibration_labels.csv --out calibration.json
    ray job submit --working-dir . -- python jobs/calibrate.py --labels s3://bucket/labels/ \
        --truth calibration_labels.csv reviewed.csv --out calibration.json

`--threshold-method` chooses how (thresholds.THRESHOLD_METHODS; the default,
thresholds.DEFAULT_THRESHOLD_METHOD, transferred best from small calibration sets in
benchmarks/compare_thresholds.py; `eer` is the paper's rule); the file records the method and
its parameters. `--truth` takes truth tables (report_id, condition, level, label) and filled-in
review exports from jobs/export_review.py alike; a later file wins where two label the same question. Pass the
calibration to jobs/label_reports.py --calibration to get labels and `uncertain` flags.
"""

from __future__ import annotations

import argparse
import logging

import pandas as pd

from ray_app.evaluation.calibration import (
    DEFAULT_TARGET,
    SOURCE_COLUMN,
    THRESHOLD_METHODS,
    build_calibration,
    describe,
)
from ray_app.evaluation.review import load_truth
from ray_app.evaluation.thresholds import DEFAULT_THRESHOLD_METHOD
from ray_app.labelling.few_shot import drop_example_reports, recorded_examples
from ray_app.pipeline.cli import run_job
from ray_app.pipeline.report_tables import read_label_rows

log = logging.getLogger("calibrate")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", required=True, nargs="+",
                        help="output folder(s) of jobs/label_reports.py (local or s3://), made "
                             "with one model, engine, method, prompt and condition definitions")
    parser.add_argument("--truth", required=True, nargs="+", help="hand-label CSV file(s)")
    parser.add_argument("--out", required=True, help="calibration JSON to write")
    parser.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET,
                        help="lower edge of the uncertainty band reaches this sensitivity")
    parser.add_argument("--target-specificity", type=float, default=DEFAULT_TARGET,
                        help="upper edge of the uncertainty band reaches this specificity")
    parser.add_argument("--threshold-method", default=DEFAULT_THRESHOLD_METHOD,
                        choices=list(THRESHOLD_METHODS),
                        help="how the threshold is chosen: " + "; ".join(
                            f"{m.name}: {m.doc}" for m in THRESHOLD_METHODS.values()))
    parser.add_argument("--threshold-param", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter of the threshold method (e.g. resamples=501 for "
                             "bootstrap_eer, bandwidth=1.5 for eer_smoothed); repeatable")
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    return parser.parse_args(argv)


def threshold_params(pairs: list[str]) -> dict:
    """--threshold-param NAME=VALUE pairs as numbers (the method refuses names it lacks)."""
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--threshold-param {pair!r}: expected NAME=VALUE")
        try:
            params[name] = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise SystemExit(f"--threshold-param {pair!r}: the value must be a number") from None
    return params


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    # Each row keeps the folder it came from: folders made with different models, engines,
    # prompts or definitions are refused by name (calibration.check_one_setup).
    labels = pd.concat([read_label_rows(path, args.s3_endpoint).assign(**{SOURCE_COLUMN: path})
                        for path in args.labels], ignore_index=True)
    # Reports the labels showed as few-shot examples (their manifests) choose no threshold.
    truth = drop_example_reports(load_truth(args.truth),
                                 recorded_examples(args.labels, args.s3_endpoint))
    calibration = build_calibration(labels, truth, args.target_sensitivity,
                                    args.target_specificity, args.threshold_method,
                                    threshold_params(args.threshold_param))
    calibration.save(args.out)
    for entry in calibration.entries:
        if entry.band_note:
            log.warning("%s %s: %s", entry.condition, entry.level or "", entry.band_note)
    covered = {(e.condition, e.level or "") for e in calibration.entries}
    asked = set(zip(labels["condition"], labels["level"].fillna("")))
    for condition, level in sorted(asked - covered):
        log.warning("%s %s: not calibrated (the hand labels lack one of the classes); its rows "
                    "will have scores but no labels", condition, level)
    print(describe(calibration))
    print(f"written to {args.out}")


if __name__ == "__main__":
    run_job(main)
