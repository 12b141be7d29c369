"""Prompt-variant ranking (ray_app/evaluation/prompt_selection.py) and jobs/select_prompt.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ray_app.evaluation.calibration import Calibration
from ray_app.evaluation.prompt_selection import rank_variants
from ray_app.labelling.prompts import (
    DEFAULT_TEMPLATE,
    PromptError,
    load_prompt,
    load_prompt_variants,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
import select_prompt as select_job  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def labels_with_noise(truth: pd.DataFrame, noise: float, prompt_hash: str) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    score = truth["label"] * (1 - noise) + rng.random(len(truth)) * noise
    return truth[["report_id", "condition"]].assign(level=None, score=score, prompt_hash=prompt_hash)


def test_ranking_puts_the_separating_variant_first():
    truth = pd.DataFrame({"report_id": [f"r{i}" for i in range(40)], "condition": "fracture",
                          "level": "", "label": [i % 2 for i in range(40)]})
    ranking = rank_variants({"vague": labels_with_noise(truth, 1.0, "h1"),
                             "sharp": labels_with_noise(truth, 0.3, "h2")}, truth)
    assert list(ranking["variant"]) == ["sharp", "vague"] and list(ranking["rank"]) == [1, 2]
    assert ranking["mean_auroc"][0] == 1.0 and ranking["prompt_hash"][0] == "h2"
    assert "auroc fracture" in ranking.columns


def test_shipped_variants_load_and_paper_matches_the_default():
    variants = load_prompt_variants(REPO / "configs" / "prompt_variants.yaml")
    assert len(variants) >= 3
    paper = load_prompt(REPO / "configs" / "prompt_variants.yaml", "paper")
    assert paper.template_hash("direct") == DEFAULT_TEMPLATE.template_hash("direct")
    assert len({v.template_hash("direct") for v in variants}) == len(variants)


@pytest.mark.parametrize("text, message", [
    ("- name: a\n  direct_question: 'Has {patient} got it?'\n", r"bad placeholder 'patient'"),
    ("- name: a\n  colour: red\n", r"unknown prompt fields \['colour'\]"),
    ("- name: a\n- name: a\n", r"names must be unique"),
    ("- name: a\n  system: 'No report here'\n", r"must contain \{report\}"),
])
def test_bad_variant_files_are_refused(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PromptError, match=message):
        load_prompt_variants(path)


def test_choosing_from_several_needs_a_name(tmp_path):
    with pytest.raises(PromptError, match="--prompt-name"):
        load_prompt(REPO / "configs" / "prompt_variants.yaml")


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("ray_cluster")
def test_job_labels_every_variant_and_calibrates_the_winner(tmp_path):
    reports = pd.DataFrame({"report_id": [f"r{i}" for i in range(16)],
                            "text": [f"FINDINGS: report number {i}." for i in range(16)]})
    reports.to_csv(tmp_path / "reports.csv", index=False)
    pd.DataFrame({"report_id": reports["report_id"], "condition": "fracture", "level": "",
                  "label": [i % 2 for i in range(16)]}).to_csv(tmp_path / "truth.csv", index=False)
    variants = tmp_path / "variants.yaml"
    variants.write_text("- name: paper\n- name: terse\n"
                        "  direct_question: 'Does the patient have {condition}?'\n")
    select_job.main(["--prompts", str(variants), "--truth", str(tmp_path / "truth.csv"),
                     "--out", str(tmp_path / "sel"), "--input", str(tmp_path / "reports.csv"),
                     "--conditions", "fracture", "--engine", "dry-run"])
    ranking = pd.read_csv(tmp_path / "sel" / "ranking.csv")
    assert sorted(ranking["variant"]) == ["paper", "terse"]
    assert ranking["mean_auroc"].is_monotonic_decreasing
    calibration = Calibration.load(tmp_path / "sel" / "calibration.json")
    assert calibration.prompt_hash == ranking["prompt_hash"][0]
    assert (tmp_path / "sel" / "variants" / "terse" / "labels").is_dir()
