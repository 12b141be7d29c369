"""Synthetic chest X-ray style reports (written here, not taken from any data set) and labels."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

_FINDINGS = [
    ("The heart is enlarged. Small left pleural effusion.", 1, 1),
    ("Heart size is normal. No pleural effusion.", 0, 0),
    ("Cardiac silhouette is enlarged. Lungs are clear.", 1, 0),
    ("Normal heart. Blunting of the costophrenic angle from effusion.", 0, 1),
]
_IMPRESSIONS = {(1, 1): "Cardiomegaly with effusion.", (0, 0): "No acute disease.",
                (1, 0): "Cardiomegaly.", (0, 1): "Pleural effusion."}


def synthetic_reports(n: int) -> pd.DataFrame:
    """n reports with FINDINGS/IMPRESSION sections, with cardiomegaly/effusion truth columns."""
    rows = []
    for i in range(n):
        findings, heart, effusion = _FINDINGS[i % len(_FINDINGS)]
        text = f"FINDINGS: {findings}\nIMPRESSION: {_IMPRESSIONS[(heart, effusion)]}"
        rows.append({"report_id": f"r{i}", "text": text, "cardiomegaly": heart,
                     "pleural_effusion": effusion})
    return pd.DataFrame(rows)


def write_reports(folder: Path, n: int, name: str = "reports") -> tuple[Path, Path]:
    """reports CSV (report_id, text) and truth CSV (report_id, condition, level, label)."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = synthetic_reports(n)
    reports, truth = folder / f"{name}.csv", folder / f"{name}_truth.csv"
    frame[["report_id", "text"]].to_csv(reports, index=False)
    frame.melt(id_vars="report_id", value_vars=["cardiomegaly", "pleural_effusion"],
               var_name="condition", value_name="label").assign(level="")[
        ["report_id", "condition", "level", "label"]].to_csv(truth, index=False)
    return reports, truth


def write_unsure_prompt(folder: Path) -> Path:
    """A prompt file offering the unsure answer 'fracture': the tiny test tokenizer spells
    " fracture" as one token (and "maybe" as five)."""
    import yaml

    path = folder / "unsure.yaml"
    path.write_text(yaml.safe_dump({
        "system": "Answer yes, no, or fracture when unsure. Report: {report}",
        "unsure_answer": "fracture", "name": "tiny_unsure"}))
    return path
