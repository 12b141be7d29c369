"""Split hand labels, by report and seeded, into an "examples" part (the few-shot example pool of
conditions with `few_shot: auto`) and a "threshold" part (calibration and evaluation): the
reports shown as examples must not be the ones a threshold is chosen on.

    python scripts/split_labels.py --truth calibration_labels.csv --examples-fraction 0.3 \
        --out-examples pool_labels.csv --out-threshold threshold_labels.csv
    python jobs/label_reports.py --input reports.csv --output out/ --conditions my_condition.yaml \
        --few-shot-pool reports.csv --few-shot-truth pool_labels.csv
    python jobs/calibrate.py --labels out/ --truth threshold_labels.csv --out calibration.json

About `--examples-fraction` of the reports, and of each condition's (and level's) positives (at
least one where there are two), go to the examples part. jobs/calibrate.py and jobs/evaluate.py
also leave out, with a warning, any hand label of a report that the labels' manifest records as
an example, so passing the whole truth table there is safe too.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ray_app.evaluation.review import load_truth  # noqa: E402
from ray_app.labelling.few_shot import split_examples  # noqa: E402
from ray_app.pipeline.cli import run_job  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--truth", nargs="+", required=True, help="hand-label CSV file(s)")
    parser.add_argument("--examples-fraction", type=float, default=0.3,
                        help="share of the reports that go to the examples part")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--out-examples", required=True,
                        help="CSV to write: the example pool's labels (--few-shot-truth)")
    parser.add_argument("--out-threshold", required=True,
                        help="CSV to write: the labels to calibrate and evaluate on")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    truth = load_truth(args.truth)
    examples, threshold = split_examples(truth, args.examples_fraction, args.seed)
    for path, part in ((args.out_examples, examples), (args.out_threshold, threshold)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        part.to_csv(path, index=False)
    for name, part in (("examples", examples), ("threshold", threshold)):
        report_level = part[part["level"].fillna("") == ""]
        counts = report_level.groupby("condition")["label"].agg(["sum", "count"])
        per_condition = ", ".join(f"{c} {int(r['sum'])}/{int(r['count'])}"
                                  for c, r in counts.iterrows())
        print(f"{name}: {part['report_id'].nunique()} reports, {len(part)} labels "
              f"(report-level positives/labelled: {per_condition or 'none'})")
    print(f"written to {args.out_examples} and {args.out_threshold} (seed {args.seed})")


if __name__ == "__main__":
    run_job(main)
