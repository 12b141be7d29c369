"""Combine the label runs of several prompt variants into one prompt-ensemble label table: per
(report, condition, level), the mean of the variants' log-odds, mapped back to a probability.

    python jobs/combine_runs.py --labels out/paper out/terse --out out/ens
    python jobs/calibrate.py --labels out/ens --truth cal_labels.csv --out ens_cal.json
    python jobs/combine_runs.py --labels archive/paper archive/terse --out archive/ens \
        --calibration ens_cal.json

The runs must be one model, engine, method and set of condition definitions, with different
prompts, over the same reports. The table's prompt hash is "ens:" + the members' sorted hashes,
so the ensemble is calibrated (jobs/calibrate.py) and evaluated (jobs/evaluate.py) like any run;
--calibration applies an ensemble calibration, as jobs/label_reports.py does for one prompt.
"""

from __future__ import annotations

import argparse
import logging

import pandas as pd
import pyarrow.fs as pafs

from ray_app.evaluation.calibration import Calibration
from ray_app.evaluation.prompt_selection import combine_label_rows
from ray_app.labelling import few_shot
from ray_app.pipeline.cli import InputError, run_job
from ray_app.pipeline.report_tables import (
    LABEL_SCHEMA,
    TableLocation,
    locate,
    read_label_rows,
    rows_table,
    write_manifest,
    write_table_atomically,
)
from ray_app.provenance import code_version, utc_now

log = logging.getLogger("combine_runs")
PART_PREFIX = "ensemble"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", required=True, nargs="+",
                        help="output folders of jobs/label_reports.py, one per prompt variant")
    parser.add_argument("--out", required=True, help="folder for the ensemble's labels/")
    parser.add_argument("--calibration", default=None,
                        help="an ensemble calibration (jobs/calibrate.py on an ensemble table) "
                             "to turn the combined scores into labels")
    parser.add_argument("--common-only", action="store_true",
                        help="keep only the questions every run scored (default: refuse runs "
                             "that scored different questions)")
    parser.add_argument("--s3-endpoint", default=None)
    return parser.parse_args(argv)


def apply_calibration(rows: pd.DataFrame, calibration: Calibration) -> pd.DataFrame:
    """label, threshold, uncertain and calibration_id as the labelling job sets them; refused
    (CalibrationError) unless the calibration was made for this ensemble and its definitions."""
    first = rows.iloc[0]
    for condition, definition in rows.drop_duplicates("condition")[
            ["condition", "definition_hash"]].itertuples(index=False):
        calibration.check_applies(first["model"], first["prompt_hash"], condition, definition)
    entries = [calibration.entry(c, lv) for c, lv in zip(rows["condition"], rows["level"])]
    return rows.assign(
        label=[None if e is None else bool(s >= e.threshold)
               for e, s in zip(entries, rows["score"])],
        threshold=[None if e is None else e.threshold for e in entries],
        uncertain=[None if e is None else e.is_uncertain(s)
                   for e, s in zip(entries, rows["score"])],
        calibration_id=calibration.calibration_id)


def write_ensemble(rows: pd.DataFrame, out: str, sources: list[str],
                   s3_endpoint: str | None = None) -> str:
    """The rows as one Parquet part under OUT/labels (replaced when the same ensemble is
    combined again), and a manifest naming the member folders."""
    loc = locate(out, s3_endpoint)
    labels = loc.child("labels")
    key = f"{rows['prompt_hash'].iloc[0]}|{rows['calibration_id'].iloc[0]}"
    stale = _parts(labels)
    others = [p for p in stale if not p.rsplit("/", 1)[-1].startswith(PART_PREFIX + "-")]
    if others:
        raise InputError(f"{labels.uri} already holds label parts of another job ({len(others)}"
                         "); write the ensemble to a new --out folder")
    first = rows.iloc[0]
    manifest = {"model": first["model"], "method": first["method"],
                "prompt_hash": first["prompt_hash"],
                "conditions": dict(zip(rows["condition"], rows["definition_hash"])),
                "calibration_id": first["calibration_id"], "ensemble_of": sources}
    # The members' few-shot example reports stay out of the ensemble's calibration too.
    examples = few_shot.recorded_examples(sources, s3_endpoint)
    if examples:
        manifest[few_shot.MANIFEST_KEY] = {c: {"report_ids": sorted(ids)}
                                           for c, ids in sorted(examples.items())}
    write_manifest(loc, manifest)
    stamped = rows.assign(code_version=code_version(), labelled_at=utc_now())
    records = stamped[LABEL_SCHEMA.names].astype(object)
    records = records.where(records.notna(), None).to_dict("records")
    written = write_table_atomically(rows_table(records, LABEL_SCHEMA), labels, PART_PREFIX, key)
    for path in stale:  # an earlier combination written here (other members or calibration)
        if path != written:
            labels.fs.delete_file(path)
    return written


def _parts(loc: TableLocation) -> list[str]:
    found = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    return sorted(f.path for f in found if f.is_file and f.base_name.endswith(".parquet"))


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    runs = {path: read_label_rows(path, args.s3_endpoint) for path in args.labels}
    rows = combine_label_rows(runs, common_only=args.common_only)
    if args.calibration:
        rows = apply_calibration(rows, Calibration.load(args.calibration))
    path = write_ensemble(rows, args.out, list(runs), args.s3_endpoint)
    print(f"{len(rows)} ensemble label rows of {len(runs)} runs (prompt hash "
          f"{rows['prompt_hash'].iloc[0]}) written to {path}")


if __name__ == "__main__":
    run_job(main)
