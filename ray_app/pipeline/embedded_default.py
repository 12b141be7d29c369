"""The embedded default: label the sample spine MRI reports that ship with the package,
calibrate on their calibration part, and print labels for the rest next to the known answers."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import pandas as pd
from sklearn.metrics import balanced_accuracy_score

from ray_app.engines import EngineConfig
from ray_app.evaluation.calibration import (
    TRUTH_KEY,
    Calibration,
    build_calibration,
    join_truth,
)
from ray_app.pipeline.label_job import JobSummary, LabelJobConfig, run_label_job
from ray_app.pipeline.report_tables import locate, read_finished

log = logging.getLogger(__name__)

SAMPLE_CONDITIONS = ["spinal_cancer", "spinal_canal_stenosis", "cauda_equina_compression",
                     "disc_herniation"]


def sample_file(name: str) -> str:
    return str(resources.files("ray_app.labelling.sample_data") / name)


def default_engine() -> EngineConfig:
    # dtype "auto": bf16 where it is native, fp32 elsewhere (ray_app/engines/devices.py), the
    # same rule as any job that names the model.
    return EngineConfig(model="qwen2.5-coder-1.5b-instruct", dtype="auto")


def sample_job_config(output: str, engine: EngineConfig | None = None) -> LabelJobConfig:
    return LabelJobConfig(
        input=sample_file("spine_reports.csv"), output=output, conditions=SAMPLE_CONDITIONS,
        id_column="report_id", text_column="text", engine=engine or default_engine(),
        reports_per_batch=4,
    )


def run_embedded_default(output: str, engine: EngineConfig | None = None) -> pd.DataFrame:
    """Label, calibrate and return the table of the sample's label part (also logged)."""
    summary: JobSummary = run_label_job(sample_job_config(output, engine))
    labels = read_finished(locate(output).child("labels"), None)
    reports = pd.read_csv(sample_file("spine_reports.csv"), dtype=str)
    truth = pd.read_csv(sample_file("spine_answers.csv"), dtype={"report_id": str, "level": str})
    split = dict(zip(reports["report_id"], reports["split"]))
    calibration_part = labels[labels["report_id"].map(split) == "calibration"]
    calibration = build_calibration(calibration_part, truth)
    calibration.save(Path(output) / "calibration.json")
    table = labelled_table(labels[labels["report_id"].map(split) == "label"], truth, calibration)
    print(format_report(table, summary, calibration, output))
    return table


def labelled_table(labels: pd.DataFrame, truth: pd.DataFrame, cal: Calibration) -> pd.DataFrame:
    """Scores with calibrated labels and the known answers, one row per question."""
    rows = join_truth(labels, truth, how="left")
    thresholds = {(e.condition, e.level or ""): e.threshold for e in cal.entries}
    rows["threshold"] = [thresholds.get((c, lv)) for c, lv in zip(rows["condition"], rows["level"])]
    rows["predicted"] = [None if t is None else int(s >= t)
                         for s, t in zip(rows["score"], rows["threshold"])]
    return rows.sort_values(TRUTH_KEY)[[*TRUTH_KEY, "score", "threshold", "predicted", "label"]]


def format_report(table: pd.DataFrame, summary: JobSummary, cal: Calibration, output: str) -> str:
    overall = table[table["level"] == ""]
    wide = overall.pivot(index="report_id", columns="condition", values="score").round(3)
    lines = [
        f"{summary.input_rows} sample reports: {summary.label_rows} scores made in "
        f"{summary.seconds:.0f} s, {summary.skipped_done} (report, condition) pairs found "
        f"already done, with {cal.model}; outputs in {output}/labels, "
        f"calibration in {output}/calibration.json ({cal.calibration_id}).",
        "",
        "Scores (p(yes)) of the label part, report-level questions:",
        wide.to_string(),
        "",
        "Calibrated labels vs known answers (threshold = equal-error rate on the calibration part):",
    ]
    for (condition, level), group in table.dropna(subset=["predicted", "label"]).groupby(
            ["condition", "level"]):
        correct = int((group["predicted"] == group["label"]).sum())
        bal = _balanced_accuracy(group)
        lines.append(f"  {condition:26s} {level or 'report':7s} threshold "
                     f"{group['threshold'].iloc[0]:.6f}  correct {correct}/{len(group)}  "
                     f"balanced accuracy {bal}")
    return "\n".join(lines)


def _balanced_accuracy(group: pd.DataFrame) -> str:
    if group["label"].nunique() < 2:
        return "n/a (one class)"
    return f"{balanced_accuracy_score(group['label'].astype(int), group['predicted']):.3f}"
