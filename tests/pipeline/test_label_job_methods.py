"""The labelling job with the rule baseline and with a prompt variant (ray_app/pipeline/label_job.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ray_app.engines import EngineConfig
from ray_app.evaluation.calibration import Calibration, CalibrationError
from ray_app.labelling.prompts import load_prompt
from ray_app.pipeline import report_tables as tables
from ray_app.pipeline.label_job import LabelJobConfig, run_label_job

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(300)]

REPORTS = pd.DataFrame({
    "report_id": ["a", "b", "c", "dup", "dup"],
    "text": ["FINDINGS: Small left pneumothorax.", "FINDINGS: No pneumothorax.",
             "IMPRESSION: Cannot exclude pneumothorax.", "x", "y"],
})


def job(tmp_path: Path, **changes) -> LabelJobConfig:
    src = tmp_path / "reports.csv"
    REPORTS.to_csv(src, index=False)
    fields = dict(input=str(src), output=str(tmp_path / "out"), conditions=["pneumothorax"],
                  engine=EngineConfig(engine="dry-run"), reports_per_batch=2)
    return LabelJobConfig(**{**fields, **changes})


def test_rules_through_the_job(tmp_path):
    summary = run_label_job(job(tmp_path, method="rules"))
    labels = tables.read_label_rows(str(tmp_path / "out"))
    assert dict(zip(labels["report_id"], labels["score"])) == {"a": 1.0, "b": 0.0, "c": 0.5}
    assert summary.error_rows == 2  # both 'dup' rows, as for the LLM
    again = run_label_job(job(tmp_path, method="rules"))
    assert again.label_rows == 0 and again.skipped_done == 3


def test_rules_refuse_a_calibration(tmp_path):
    path = tmp_path / "cal.json"
    Calibration("rules", "rules", "p", {}, ()).save(path)
    with pytest.raises(CalibrationError, match="without --calibration"):
        run_label_job(job(tmp_path, method="rules", calibration=str(path)))


def test_prompt_variant_flows_into_rows(tmp_path):
    variants = tmp_path / "prompts.yaml"
    variants.write_text("- name: terse\n  direct_question: 'Does the patient have {condition}?'\n"
                        "- name: paper\n")
    run_label_job(job(tmp_path, prompt=str(variants), prompt_name="terse"))
    labels = tables.read_label_rows(str(tmp_path / "out"))
    expected = load_prompt(variants, "terse").template_hash("direct")
    assert set(labels["prompt_hash"]) == {expected}
