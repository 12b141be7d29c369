"""Metrics and bootstrap intervals (ray_app/evaluation/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

from ray_app.evaluation.metrics import METRICS, binary_metrics, bootstrap_intervals


def noisy_scores(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)


def test_worked_example():
    # threshold 0.5: predictions 0 0 1 1 | 1 0 1 1 -> TP 3, FN 1, FP 2, TN 2
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.3, 0.6, 0.8, 0.7, 0.4, 0.5, 0.9]
    m = binary_metrics(labels, scores, 0.5)
    assert (m["n"], m["positives"]) == (8, 4)
    assert m["sensitivity"] == 0.75 and m["specificity"] == 0.5
    assert m["balanced_accuracy"] == 0.625
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_label_metrics_match_scikit_learn(threshold):
    y, s = noisy_scores()
    predicted = (s >= threshold).astype(int)
    m = binary_metrics(y, s, threshold)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, predicted))
    assert m["f1"] == pytest.approx(f1_score(y, predicted))
    assert m["sensitivity"] == pytest.approx(recall_score(y, predicted))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - predicted))


def test_one_class_gives_nan_for_what_needs_two():
    m = binary_metrics([1, 1, 1], [0.2, 0.6, 0.9], 0.5)
    assert math.isnan(m["auroc"]) and math.isnan(m["eer"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3)


def test_bootstrap_is_deterministic_for_a_seed_and_contains_the_estimate():
    y, s = noisy_scores()
    point = binary_metrics(y, s, 0.5)
    first = bootstrap_intervals(y, s, 0.5, resamples=300, seed=7)
    assert first == bootstrap_intervals(y, s, 0.5, resamples=300, seed=7)
    assert first != bootstrap_intervals(y, s, 0.5, resamples=300, seed=8)
    for metric in METRICS:
        low, high = first[metric]
        assert low <= point[metric] <= high, metric
        assert high - low > 0.01, metric  # 120 noisy reports cannot pin a metric down


def test_bootstrap_keeps_the_class_counts():
    # Stratified resampling: with 3 positives in 60, every resample still has 3 positives,
    # so AUROC is defined in every draw and the interval is finite.
    y = np.array([1, 1, 1] + [0] * 57)
    s = np.linspace(0, 1, 60)[::-1]
    low, high = bootstrap_intervals(y, s, 0.5, resamples=200)["auroc"]
    assert np.isfinite(low) and np.isfinite(high) and low <= high
