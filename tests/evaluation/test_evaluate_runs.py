"""Side-by-side evaluation and its report (ray_app/evaluation/runs.py, evaluation_report.py,
jobs/evaluate.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ray_app.evaluation.calibration import Calibration, ThresholdEntry
from ray_app.evaluation.runs import EvaluationConfig, Run, evaluate_runs, split_reports

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
import evaluate as evaluate_job  # noqa: E402

N = 200
CONDITIONS = ("fracture", "pneumothorax")


def truth_table(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame([{"report_id": f"r{i}", "condition": c, "level": "",
                          "label": int(rng.random() < 0.3)} for i in range(N) for c in CONDITIONS])


def run_rows(truth: pd.DataFrame, noise: float, seed: int, model: str = "m") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    score = np.clip(truth["label"] * (1 - noise) + rng.random(len(truth)) * noise, 0, 1)
    return truth[["report_id", "condition"]].assign(
        level=None, score=score, method="direct", model=model, engine="transformers",
        prompt_hash="p", definition_hash="d")


def test_split_is_seeded_and_disjoint():
    truth = truth_table()
    cal, ev = split_reports(truth, 0.3, seed=1)
    assert cal.isdisjoint(ev) and len(cal | ev) == N and len(cal) == 60
    assert (cal, ev) == split_reports(truth, 0.3, seed=1)
    assert cal != split_reports(truth, 0.3, seed=2)[0]
    with pytest.raises(ValueError, match="must be in"):
        split_reports(truth, 1.0, seed=0)


@pytest.mark.parametrize("seed", range(10))
def test_split_gives_a_rare_finding_positives_on_both_sides(seed):
    """4 positives in 200 reports: a plain shuffle leaves the calibration side without any
    about a quarter of the time (0.7**4); the stratified split never does."""
    truth = truth_table()
    rare = truth["condition"] == "fracture"
    truth.loc[rare, "label"] = 0
    truth.loc[rare & truth["report_id"].isin(sorted(truth["report_id"].unique())[:4]), "label"] = 1
    cal, ev = split_reports(truth, 0.3, seed=seed)
    positives = set(truth.loc[rare & (truth["label"] == 1), "report_id"])
    assert len(positives & cal) >= 1 and len(positives & ev) >= 1  # round(4 * 0.3) = 1 at least
    assert len(cal) == 60 and cal.isdisjoint(ev)


def test_better_run_scores_better_on_the_same_reports():
    truth = truth_table()
    runs = [Run("good", run_rows(truth, 0.6, 1)), Run("noise", run_rows(truth, 1.0, 2))]
    metrics = evaluate_runs(runs, truth, EvaluationConfig(bootstrap=200))
    assert len(metrics) == 4 and set(metrics["n"]) == {140}  # the same 140 held-out reports
    by = metrics.set_index(["run", "condition"])
    for condition in CONDITIONS:
        good, noise = by.loc[("good", condition)], by.loc[("noise", condition)]
        assert good["auroc"] > 0.85 and abs(noise["auroc"] - 0.5) < 0.15
        assert good["auroc_low"] <= good["auroc"] <= good["auroc_high"]
        assert good["threshold_source"] == "EER on 60 calibration reports"


def test_stored_calibration_supplies_the_threshold():
    truth = truth_table()
    calibration = Calibration("m", "direct", "p", {"fracture": "d"},
                              (ThresholdEntry("fracture", None, 0.75, 60, 20, 0.9, 0.1),))
    run = Run("stored", run_rows(truth, 0.6, 1), calibration)
    metrics = evaluate_runs([run], truth, EvaluationConfig(bootstrap=50))
    by = metrics.set_index("condition")
    assert by.loc["fracture", "threshold"] == 0.75
    assert by.loc["fracture", "threshold_source"] == calibration.calibration_id
    # pneumothorax is not calibrated: listed with the reason, not left out
    assert np.isnan(by.loc["pneumothorax", "threshold"])
    assert np.isnan(by.loc["pneumothorax", "balanced_accuracy"]) and by.loc["pneumothorax", "auroc"] > 0.85
    assert by.loc["pneumothorax", "threshold_source"] == "not evaluated: not in the stored calibration"


def test_a_calibration_part_without_positives_is_reported_with_the_reason(tmp_path):
    """A rare finding whose positives all fall in the evaluation part gets no threshold: the
    report says so instead of dropping the finding."""
    truth = truth_table()
    fracture_rows = truth["condition"] == "fracture"
    truth.loc[fracture_rows, "label"] = 0
    _, evaluation_ids = split_reports(truth, 0.3, seed=0)
    # one positive: too few to stratify, and it lies on the evaluation side
    truth.loc[fracture_rows & (truth["report_id"] == sorted(evaluation_ids)[0]), "label"] = 1
    run = Run("good", run_rows(truth, 0.6, 1))
    metrics = evaluate_runs([run], truth, EvaluationConfig(bootstrap=50))
    fracture = metrics.set_index("condition").loc["fracture"]
    assert np.isnan(fracture["threshold"]) and fracture["positives"] > 0
    assert not np.isnan(fracture["auroc"]) and np.isnan(fracture["balanced_accuracy"])  # ranking only
    assert "0 positives" in fracture["threshold_source"]
    assert "--calibration-fraction" in fracture["threshold_source"]
    from ray_app.evaluation.report import write_report
    from ray_app.evaluation.runs import scored_rows

    _, evaluation_ids = split_reports(truth, 0.3, seed=0)
    scored = {"good": scored_rows(run, truth, evaluation_ids)}
    report = write_report(metrics, [run], scored, tmp_path, []).read_text()
    assert "## fracture" in report and "0 positives" in report
    assert not (tmp_path / "plots" / "fracture_roc.png").exists()
    assert (tmp_path / "plots" / "pneumothorax_roc.png").stat().st_size > 0


def write_run(folder: Path, rows: pd.DataFrame) -> str:
    (folder / "labels").mkdir(parents=True)
    rows.to_parquet(folder / "labels" / "part-0.parquet")
    return str(folder)


def test_job_writes_report_metrics_and_plots(tmp_path):
    truth = truth_table()
    truth.to_csv(tmp_path / "truth.csv", index=False)
    good = write_run(tmp_path / "good", run_rows(truth, 0.6, 1))
    rules = write_run(tmp_path / "rules", run_rows(truth, 0.9, 3, model="rules:x"))
    out = tmp_path / "eval"
    evaluate_job.main(["--truth", str(tmp_path / "truth.csv"), "--out", str(out),
                       "--run", f"llm={good}", "--run", f"rules={rules}", "--bootstrap", "100"])
    report = (out / "report.md").read_text()
    assert "| run | fracture | pneumothorax |" in report
    assert "| llm | " in report and "| rules | " in report and "`rules:x`" in report
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["run"]) == {"llm", "rules"}
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == sorted(f"{c}_{k}.png" for c in CONDITIONS
                           for k in ("roc", "hist", "reliability"))
    for png in (out / "plots").iterdir():
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"plots/{png.name}" in report


def test_job_refuses_a_badly_named_run(tmp_path):
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        evaluate_job.main(["--truth", "t.csv", "--out", str(tmp_path), "--run", "nameonly"])
