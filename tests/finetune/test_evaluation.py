from __future__ import annotations

import pytest

from ray_app.finetune.evaluation import binary_summary, labeller_metrics, rouge


def test_rouge_known_values():
    pytest.importorskip("rouge_score", reason="pip install rouge-score")
    assert rouge(["no acute disease"], ["no acute disease"]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    # unigrams 2/3 match; bigrams: 'the cat' of 2 each; LCS 2 of 3
    assert rouge(["the cat sat"], ["the cat ran"]) == pytest.approx(
        {"rouge1": 2 / 3, "rouge2": 0.5, "rougeL": 2 / 3})
    assert rouge(["a", "b"], ["a", "c"])["rouge1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="as many predictions"):
        rouge(["a"], [])


def test_binary_summary_at_eer_threshold():
    got = binary_summary([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9])
    assert got["auroc"] == pytest.approx(0.75)
    # ROC points: at 0.6 FPR = FNR = 0.5 (the EER point); labels there: [0, 1, 0, 1]
    assert (got["threshold"], got["eer"]) == (0.6, 0.5)
    assert got["balanced_accuracy"] == pytest.approx(0.5)
    assert "auroc" not in binary_summary([1, 1], [0.2, 0.3])  # one class: no AUROC


def test_labeller_metrics_group_by_condition():
    scores = {"r1/heart/": 0.9, "r2/heart/": 0.2, "r1/effusion/": 0.3, "r2/effusion/": 0.8}
    truth = {"r1/heart/": 1, "r2/heart/": 0, "r1/effusion/": 1, "r2/effusion/": 0}
    got = labeller_metrics(scores, truth)
    assert got["heart"]["auroc"] == 1.0 and got["effusion"]["auroc"] == 0.0
