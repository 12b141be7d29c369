"""Review export and hand-label tables (ray_app/evaluation/review.py, jobs/export_review.py,
jobs/calibrate.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from ray_app.evaluation.calibration import Calibration, CalibrationError
from ray_app.evaluation.review import load_truth, read_review, review_rows, write_review

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
import calibrate as calibrate_job  # noqa: E402
import export_review as export_job  # noqa: E402


def label_rows() -> pd.DataFrame:
    return pd.DataFrame({
        "report_id": ["r1", "r2", "r3", "r4"],
        "condition": ["fracture"] * 4,
        "level": [None] * 4,
        "score": [0.1, 0.5, 0.95, 0.97],
        "label": [False, False, True, True],
        "threshold": [0.9] * 4,
        "uncertain": [False, True, False, False],
    })


def test_review_picks_uncertain_and_disagreeing_rows():
    truth = pd.DataFrame({"report_id": ["r1", "r3", "r4"], "condition": ["fracture"] * 3,
                          "level": ["", "", ""], "label": [0, 0, 1]})
    reports = pd.DataFrame({"report_id": ["r2", "r3"], "text": ["maybe", "healed fracture"]})
    rows = review_rows(label_rows(), truth, reports)
    assert list(rows["report_id"]) == ["r2", "r3"]
    assert rows["reason"][0] == "score inside the uncertainty band"
    assert rows["reason"][1] == "calibrated label disagrees with the reference label"
    assert list(rows["text"]) == ["maybe", "healed fracture"]
    assert rows["reference_label"].isna()[0] and rows["reference_label"][1] == 0
    assert rows["evidence"].isna().all()  # labelled before rows kept an evidence sentence


def test_review_shows_the_sentence_that_gave_the_score():
    labels = label_rows().assign(evidence=[None, "Possible healed rib fracture.", None, None])
    rows = review_rows(labels)
    assert list(rows["evidence"]) == ["Possible healed rib fracture."]


def test_review_needs_calibrated_labels():
    rows = label_rows().assign(label=None)
    with pytest.raises(CalibrationError, match="rerun the labelling job with --calibration"):
        review_rows(rows)


def test_review_round_trip_becomes_truth(tmp_path):
    path = tmp_path / "review.csv"
    write_review(review_rows(label_rows()), path)
    filled = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(filled["report_id"]) == ["r2"]
    filled.loc[0, "reviewed_label"] = "Yes"
    filled.to_csv(path, index=False)
    truth = read_review(path)
    assert truth.to_dict("records") == [
        {"report_id": "r2", "condition": "fracture", "level": "", "label": 1}]


def test_review_rejects_an_unreadable_answer_with_its_line(tmp_path):
    path = tmp_path / "review.csv"
    rows = review_rows(label_rows().assign(uncertain=True))
    rows["reviewed_label"] = ["1", "", "maybe", "0"]
    write_review(rows, path)
    with pytest.raises(CalibrationError, match=r"line 4: reviewed_label 'maybe'"):
        read_review(path)


def test_load_truth_later_file_wins(tmp_path):
    first, second = tmp_path / "truth.csv", tmp_path / "review.csv"
    pd.DataFrame({"report_id": ["r1", "r2"], "condition": ["fracture"] * 2,
                  "label": [0, 0]}).to_csv(first, index=False)
    review = review_rows(label_rows())
    review["reviewed_label"] = ["1"]
    write_review(review, second)
    truth = load_truth([first, second]).sort_values("report_id")
    assert truth["label"].tolist() == [0, 1] and truth["level"].tolist() == ["", ""]


def test_load_truth_refuses_bad_tables(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"report_id": ["r1"], "label": [1]}).to_csv(path, index=False)
    with pytest.raises(CalibrationError, match=r"missing \['condition'\]"):
        load_truth([path])
    pd.DataFrame({"report_id": ["r1"], "condition": ["x"], "label": [2]}).to_csv(path, index=False)
    with pytest.raises(CalibrationError, match="0 or 1"):
        load_truth([path])


def write_job_output(folder: Path, n: int = 60) -> pd.DataFrame:
    """A labelling job's output folder: 30 positives scoring high, 30 negatives low, overlapping."""
    scores = [0.3 + 0.01 * i for i in range(n)]
    rows = pd.DataFrame({
        "report_id": [f"r{i}" for i in range(n)], "condition": "fracture", "level": None,
        "method": "direct", "score": scores, "model": "m", "engine": "transformers",
        "definition_hash": "d", "prompt_hash": "p",
    })
    (folder / "labels").mkdir(parents=True)
    rows.to_parquet(folder / "labels" / "part-0.parquet")
    truth = pd.DataFrame({"report_id": rows["report_id"], "condition": "fracture", "level": "",
                          "label": [int(i >= n // 2 or i % 7 == 0) for i in range(n)]})
    truth.to_csv(folder / "truth.csv", index=False)
    return truth


def test_calibrate_job_writes_a_calibration_with_a_band(tmp_path):
    write_job_output(tmp_path)
    out = tmp_path / "cal.json"
    calibrate_job.main(["--labels", str(tmp_path), "--truth", str(tmp_path / "truth.csv"),
                        "--out", str(out), "--target-sensitivity", "0.9",
                        "--target-specificity", "0.9"])
    entry = Calibration.load(out).entry("fracture", None)
    assert entry.n == 60 and entry.positives == 35
    assert entry.band_low <= entry.threshold <= entry.band_high
    assert json.loads(out.read_text())["format_version"] == 2


def test_export_job_writes_the_band_rows(tmp_path):
    write_job_output(tmp_path)
    rows = pd.read_parquet(tmp_path / "labels")
    rows = rows.assign(label=rows["score"] >= 0.6, threshold=0.6,
                       uncertain=rows["score"].between(0.5, 0.7))
    rows.to_parquet(tmp_path / "labels" / "part-0.parquet")
    out = tmp_path / "review.csv"
    export_job.main(["--labels", str(tmp_path), "--out", str(out)])
    exported = pd.read_csv(out)
    assert len(exported) == int(rows["uncertain"].sum()) > 0


def test_an_empty_truth_file_is_named(tmp_path):
    from ray_app.evaluation.calibration import CalibrationError
    from ray_app.evaluation.review import load_truth

    empty = tmp_path / "truth.csv"
    empty.write_text("")
    with pytest.raises(CalibrationError, match=r"truth.csv is empty: a truth table needs"):
        load_truth([empty])
