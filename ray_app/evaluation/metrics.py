"""Metrics of scores and thresholded labels against known labels, with bootstrap intervals.

The same functions score the LLM labeller, the rule baseline and the imaging classifiers, so
their tables are comparable. AUROC and EER judge the scores; balanced accuracy, F1,
sensitivity and specificity judge the labels `score >= threshold`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from ray_app.evaluation.thresholds import eer_threshold

SCORE_METRICS = ("auroc", "eer")
LABEL_METRICS = ("balanced_accuracy", "f1", "sensitivity", "specificity")
METRICS = SCORE_METRICS + LABEL_METRICS


def binary_metrics(labels: Sequence[int], scores: Sequence[float], threshold: float) -> dict:
    """n, positives, threshold and every metric in METRICS (NaN where a class is missing).

    The label metrics come from the confusion counts (the bootstrap calls this a thousand
    times per group, and scikit-learn's per-call validation would dominate); tests check
    them against scikit-learn's functions."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    predicted = s >= threshold
    tp = int(np.sum(predicted & (y == 1)))
    fp = int(np.sum(predicted & (y == 0)))
    positives = int(y.sum())
    negatives = len(y) - positives
    sensitivity = tp / positives if positives else float("nan")
    specificity = (negatives - fp) / negatives if negatives else float("nan")
    both_classes = positives > 0 and negatives > 0
    return {
        "n": int(len(y)),
        "positives": positives,
        "threshold": float(threshold),
        "auroc": float(roc_auc_score(y, s)) if both_classes else float("nan"),
        "eer": eer_threshold(y, s)[1] if both_classes else float("nan"),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "f1": 2 * tp / (tp + fp + positives) if tp + fp + positives else 0.0,
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def bootstrap_intervals(labels: Sequence[int], scores: Sequence[float], threshold: float,
                        resamples: int = 1000, seed: int = 0,
                        confidence: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each metric, the threshold held fixed.

    Positives and negatives are resampled separately (a stratified bootstrap): with the few
    positives of a calibration-sized set, a plain resample often draws no positive at all and
    AUROC is undefined. The same seed gives the same intervals.
    """
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in (0, 1)]
    draws = {m: [] for m in METRICS}
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups if len(g)])
        values = binary_metrics(y[idx], s[idx], threshold)
        for m in METRICS:
            draws[m].append(values[m])
    tail = (1.0 - confidence) / 2 * 100
    return {m: _percentiles(v, tail) for m, v in draws.items()}


def _percentiles(values: list[float], tail: float) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return (float("nan"), float("nan"))
    low, high = np.percentile(v, [tail, 100 - tail])
    return (float(low), float(high))
