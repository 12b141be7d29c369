"""Export the rows a person should review: scores inside the uncertainty band, and calibrated
labels that disagree with a reference label. Fill in `reviewed_label` (1/0) and pass the file back
to jobs/calibrate.py --truth.

    python jobs/export_review.py --labels out/ --reports reports.csv --out review.csv
    python jobs/export_review.py --labels out/ --truth reference.csv --out review.csv
"""

from __future__ import annotations

import argparse
import logging

import pandas as pd
import pyarrow.parquet as pq

from ray_app.evaluation.review import load_truth, review_rows, write_review
from ray_app.pipeline.cli import ColumnError, run_job
from ray_app.pipeline.report_tables import read_label_rows

log = logging.getLogger("export_review")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", required=True,
                        help="output folder of jobs/label_reports.py run with --calibration")
    parser.add_argument("--out", required=True, help="review CSV to write")
    parser.add_argument("--truth", nargs="*", default=[], help="reference label CSV file(s)")
    parser.add_argument("--reports", default=None,
                        help="CSV or Parquet of the reports, to put their text in the review")
    parser.add_argument("--id-column", default="report_id")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--s3-endpoint", default=None)
    return parser.parse_args(argv)


def read_reports(path: str, id_column: str, text_column: str) -> pd.DataFrame:
    wanted = (id_column, text_column)
    if path.endswith(".parquet"):
        names = pq.read_schema(path).names
        frame = pd.read_parquet(path, columns=[c for c in wanted if c in names])
    else:
        frame = pd.read_csv(path, usecols=lambda c: c in wanted, dtype={id_column: str})
        names = list(pd.read_csv(path, nrows=0).columns)
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise ColumnError(f"column(s) {missing} not in {path} (columns: {names}); set "
                          "--id-column / --text-column")
    return frame.rename(columns={id_column: "report_id", text_column: "text"})


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    labels = read_label_rows(args.labels, args.s3_endpoint)
    truth = load_truth(args.truth) if args.truth else None
    reports = read_reports(args.reports, args.id_column, args.text_column) if args.reports else None
    rows = review_rows(labels, truth, reports)
    write_review(rows, args.out)
    print(f"{len(rows)} of {len(labels)} rows to review -> {args.out}")


if __name__ == "__main__":
    run_job(main)
