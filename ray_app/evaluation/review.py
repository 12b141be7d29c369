"""Hand labels: truth tables, and review exports whose answers come back as calibration data.

Rows go to review when the calibrated score is inside the uncertainty band, or when a reference
label exists and disagrees with the calibrated label. The reviewer fills `reviewed_label` with
1/0 (or yes/no); `read_review` turns the filled rows into a truth table that `jobs/calibrate.py`
takes like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from ray_app.evaluation.calibration import TRUTH_KEY, CalibrationError

REVIEW_COLUMNS = [*TRUTH_KEY, "score", "label", "threshold", "reason", "reference_label",
                  "evidence", "text", "reviewed_label"]
_ANSWERS = {"1": 1, "0": 0, "yes": 1, "no": 0, "true": 1, "false": 0, "y": 1, "n": 0}


def review_rows(labels: pd.DataFrame, truth: pd.DataFrame | None = None,
                reports: pd.DataFrame | None = None) -> pd.DataFrame:
    """Uncertain and disagreeing rows of a calibrated label table, ready for a reviewer.

    `labels` must carry calibrated labels (the job ran with --calibration). `truth`
    (report_id, condition, level, label) marks disagreements; `reports` (report_id, text) adds
    the report text so the reviewer need not look it up."""
    if labels["label"].isna().all():
        raise CalibrationError("these label rows have no calibrated labels: rerun the labelling "
                               "job with --calibration before exporting a review")
    rows = labels.assign(level=labels["level"].fillna("").astype(str),
                         report_id=labels["report_id"].astype(str))
    rows = rows.assign(reference_label=_reference(rows, truth))
    uncertain = rows["uncertain"].fillna(False).astype(bool)
    label = rows["label"].astype("boolean")
    disagrees = rows["reference_label"].notna() & (
        rows["reference_label"].astype("Int64") != label.astype("Int64"))
    picked = rows[uncertain | disagrees].copy()
    picked["reason"] = [_reason(u, d) for u, d in zip(uncertain[picked.index],
                                                       disagrees[picked.index])]
    texts = dict(zip(reports["report_id"].astype(str), reports["text"])) if reports is not None \
        else {}
    picked["text"] = picked["report_id"].map(texts)
    if "evidence" not in picked:  # a table labelled before rows kept their evidence sentence
        picked["evidence"] = None
    picked["reviewed_label"] = ""
    return picked[REVIEW_COLUMNS].sort_values([*TRUTH_KEY]).reset_index(drop=True)


def _reference(rows: pd.DataFrame, truth: pd.DataFrame | None) -> pd.Series:
    if truth is None:
        return pd.Series(pd.NA, index=rows.index, dtype="Int64")
    truth = truth.assign(level=truth["level"].fillna("").astype(str),
                         report_id=truth["report_id"].astype(str))
    merged = rows[TRUTH_KEY].merge(truth[[*TRUTH_KEY, "label"]], on=TRUTH_KEY, how="left")
    return pd.Series(merged["label"].astype("Int64").to_numpy(), index=rows.index)


def _reason(uncertain: bool, disagrees: bool) -> str:
    parts = (["score inside the uncertainty band"] if uncertain else []) + \
        (["calibrated label disagrees with the reference label"] if disagrees else [])
    return "; ".join(parts)


def write_review(rows: pd.DataFrame, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(path, index=False)


def read_review(path: str | Path) -> pd.DataFrame:
    """The reviewed rows of a review CSV as a truth table (report_id, condition, level, label).

    Rows left blank are skipped; an answer that is not 1/0/yes/no is an error naming its line,
    because a silently dropped answer would bias the next calibration."""
    data = pd.read_csv(path, dtype={"report_id": str, "level": str, "reviewed_label": str},
                       keep_default_na=False)
    missing = [c for c in (*TRUTH_KEY, "reviewed_label") if c not in data.columns]
    if missing:
        raise CalibrationError(f"{path}: not a review file, missing columns {missing}")
    answers = data["reviewed_label"].str.strip().str.lower()
    filled = answers != ""
    bad = filled & ~answers.isin(list(_ANSWERS))
    if bad.any():
        line = int(bad.idxmax()) + 2  # header is line 1
        raise CalibrationError(
            f"{path}, line {line}: reviewed_label {data['reviewed_label'][bad].iloc[0]!r} is not "
            f"one of 1/0/yes/no; fix it or leave it blank to skip the row")
    return data[filled].assign(label=answers[filled].map(_ANSWERS).astype(int))[
        [*TRUTH_KEY, "label"]].reset_index(drop=True)


def load_truth(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Hand labels from CSV files: truth tables (report_id, condition, level, label) and filled-in
    review exports (their `reviewed_label` column) alike. A later file wins where two label the
    same question, so a review corrects the table it came from."""
    frames = []
    for path in paths:
        try:
            header = pd.read_csv(path, nrows=0).columns
        except pd.errors.EmptyDataError:
            raise CalibrationError(f"{path} is empty: a truth table needs a header row "
                                   "report_id,condition,label (level optional) and its rows")
        if "reviewed_label" in header:
            frames.append(read_review(path))
            continue
        table = pd.read_csv(path, dtype={"report_id": str, "level": str}, keep_default_na=False)
        missing = [c for c in (*TRUTH_KEY[:2], "label") if c not in table.columns]
        if missing:
            raise CalibrationError(f"{path}: a truth table needs columns report_id, condition, "
                                   f"label (and optionally level); missing {missing}")
        if not table["label"].isin([0, 1]).all():
            raise CalibrationError(f"{path}: labels must be 0 or 1")
        frames.append(table.assign(level=table.get("level", ""))[[*TRUTH_KEY, "label"]])
    truth = pd.concat(frames, ignore_index=True)
    return truth.drop_duplicates(TRUTH_KEY, keep="last").reset_index(drop=True)
