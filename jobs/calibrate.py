"""Choose equal-error-rate thresholds (and an uncertainty band) from labelling-job scores and
hand labels, and store them in a versioned calibration file.

    python jobs/calibrate.py --labels out/ --truth calibration_labels.csv --out calibration.json
    ray job submit --working-dir . -- python jobs/calibrate.py --labels s3://bucket/labels/ \
        --truth calibration_labels.csv reviewed.csv --out calibration.json

`--truth` takes truth tables (report_id, condition, level, label) and filled-in review exports
from jobs/export_review.py alike; a later file wins where two label the same question. Pass the
calibration to jobs/label_reports.py --calibration to get labels and `uncertain` flags.
"""

from __future__ import annotations

import argparse
import logging

import pandas as pd

from ray_app.evaluation.calibration import (
    DEFAULT_TARGET,
    SOURCE_COLUMN,
    build_calibration,
    describe,
)
from ray_app.evaluation.review import load_truth
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
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    # Each row keeps the folder it came from: folders made with different models, engines,
    # prompts or definitions are refused by name (calibration.check_one_setup).
    labels = pd.concat([read_label_rows(path, args.s3_endpoint).assign(**{SOURCE_COLUMN: path})
                        for path in args.labels], ignore_index=True)
    truth = load_truth(args.truth)
    calibration = build_calibration(labels, truth, args.target_sensitivity,
                                    args.target_specificity)
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
