"""Threshold estimates from a calibration set's scores and hand labels: the paper's equal-error
rate point (`eer`) and steadier estimates of it that transfer better from a handful of positives
(see benchmarks/compare_thresholds.py for the measurement behind DEFAULT_THRESHOLD_METHOD).
Plain numpy / scipy; calibration.py stores what these choose."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit, logit, ndtr


class CalibrationError(ValueError):
    """A calibration cannot be made, read, or applied to these scores."""


def _check_both_classes(y: np.ndarray) -> None:
    if y.min(initial=1) == y.max(initial=0) or len(y) < 2:
        raise CalibrationError(f"a threshold needs both positives and negatives (got "
                               f"{int(y.sum())} positives of {len(y)})")


def eer_threshold(labels: Sequence[int], scores: Sequence[float]) -> tuple[float, float]:
    """(threshold, eer): the ROC point where false-positive rate = false-negative rate.

    `score >= threshold` reproduces that ROC point exactly. Where no point has FPR = FNR the
    closest one is taken, and the EER is the mean of its two rates.
    """
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    _check_both_classes(y)
    thresholds, fpr, tpr = _roc_points(y, s)
    fnr = 1.0 - tpr
    best = int(np.argmin(np.abs(fpr - fnr)))  # the first, i.e. highest, threshold of a tie
    return float(thresholds[best]), float((fpr[best] + fnr[best]) / 2)


def _roc_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, fpr, tpr), thresholds falling, one per distinct score: scikit-learn's
    roc_curve(drop_intermediate=False) less its +inf point, in the same arithmetic (so the same
    floats), without its input checks that dominate the bootstrap's thousands of calls."""
    order = np.argsort(s, kind="mergesort")[::-1]
    ranked, hits = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    tps = np.cumsum(hits, dtype=float)[last_of_tie]
    fps = 1 + last_of_tie - tps
    return ranked[last_of_tie], fps / fps[-1], tps / tps[-1]


# --- Threshold methods ----------------------------------------------------------------------------
#
# With a handful of calibration positives the empirical EER point jumps between neighbouring
# scores, and its threshold is always one calibration score (often the lowest positive's), so a
# new positive just below it is missed. The steadier methods below estimate the same operating
# point from smoothed or fitted class distributions, or take the median over bootstrap
# resamples. Smoothing and fitting work on the log-odds scale, logit(score): LLM scores pile up
# near 1.0 (0.99, 0.999, 0.9999 are equally far apart there, and close together as
# probabilities), and the classes look roughly normal on it.

# Scores are float32 sigmoids, which cannot hold a probability closer to 0 or 1 than ~6e-8: an
# engine's exact 1.0 is a saturated 0.99999994. Clipping there keeps log-odds finite (|z| <=
# 16.1) without merging scores the engine told apart.
LOGIT_CLIP = 1e-7
Fit = Callable[[np.ndarray, np.ndarray, dict], float]


@dataclass(frozen=True)
class ThresholdMethod:
    name: str
    fit: Fit  # (labels, scores on the working scale, params) -> threshold on that scale
    defaults: dict
    doc: str
    on_log_odds: bool  # works on logit(score); otherwise on the scores themselves (rank-based)


def _eer(y: np.ndarray, s: np.ndarray, params: dict) -> float:
    return eer_threshold(y, s)[0]


def _youden(y: np.ndarray, s: np.ndarray, params: dict) -> float:
    """Highest threshold maximising sensitivity + specificity - 1 on the calibration ROC."""
    thresholds, fpr, tpr = _roc_points(y, s)
    return float(thresholds[int(np.argmax(tpr - fpr))])


def _bootstrap_eer(y: np.ndarray, s: np.ndarray, params: dict) -> float:
    """Median EER threshold over class-stratified resamples (the lower median: always one of
    the calibration scores, so full precision is kept)."""
    rng = np.random.default_rng(params["seed"])
    groups = [s[y == 0], s[y == 1]]
    labels = np.repeat([0, 1], [len(g) for g in groups])
    cuts = [eer_threshold(labels, np.concatenate([rng.choice(g, len(g)) for g in groups]))[0]
            for _ in range(params["resamples"])]
    return float(np.quantile(cuts, 0.5, method="inverted_cdf"))


def _eer_midpoint(y: np.ndarray, z: np.ndarray, params: dict) -> float:
    """The EER point's threshold moved halfway down to the next lower calibration score: every
    threshold in that gap gives the same calibration ROC point, and its top edge is the score of
    a calibration report itself."""
    cut = eer_threshold(y, z)[0]
    below = z[z < cut]
    return float((cut + below.max()) / 2) if len(below) else cut


def _spread(values: np.ndarray) -> float:
    if len(values) < 2:
        return 0.0
    iqr = np.subtract(*np.percentile(values, [75, 25])) / 1.349
    sd = float(np.std(values, ddof=1))
    return min(sd, iqr) if iqr > 0 else sd


def _class_spreads(groups: list[np.ndarray], scale: Callable[[np.ndarray], float]) -> list[float]:
    """Each class's spread; a class too small or too tied to have one borrows the other's, and
    when neither has one a small fraction of the whole range is used."""
    spreads = [scale(g) for g in groups]
    whole = np.concatenate(groups)
    fallback = max(spreads) if max(spreads) > 0 else max(float(np.ptp(whole)) * 0.05, 1e-3)
    return [v if v > 0 else fallback for v in spreads]


def _eer_binormal(y: np.ndarray, z: np.ndarray, params: dict) -> float:
    """EER of the ROC of two normal distributions fitted to the classes' log-odds: the point
    where (t - mean1) / sd1 = (mean0 - t) / sd0."""
    groups = [z[y == 0], z[y == 1]]
    sd0, sd1 = _class_spreads(groups, lambda g: float(np.std(g, ddof=1)) if len(g) > 1 else 0.0)
    mean0, mean1 = (float(np.mean(g)) for g in groups)
    return (mean1 * sd0 + mean0 * sd1) / (sd0 + sd1)


def _kernel_cdfs(y: np.ndarray, z: np.ndarray, params: dict):
    """Gaussian-kernel smoothed CDFs of the two classes (Silverman's bandwidth per class,
    times `bandwidth`), and a bracket that holds every crossing."""
    groups = [z[y == 0], z[y == 1]]
    widths = [params["bandwidth"] * 0.9 * v * len(g) ** -0.2
              for g, v in zip(groups, _class_spreads(groups, _spread))]

    def cdf(k: int, t: float) -> float:
        return float(np.mean(ndtr((t - groups[k]) / widths[k])))

    reach = 10 * max(widths)
    return cdf, (float(z.min()) - reach, float(z.max()) + reach)


def _eer_smoothed(y: np.ndarray, z: np.ndarray, params: dict) -> float:
    """EER of the kernel-smoothed ROC: where 1 - F0(t) = F1(t). F0 + F1 - 1 rises from -1 to
    1, so the crossing is unique."""
    cdf, (low, high) = _kernel_cdfs(y, z, params)
    return float(brentq(lambda t: cdf(0, t) + cdf(1, t) - 1.0, low, high, xtol=1e-10))


THRESHOLD_METHODS: dict[str, ThresholdMethod] = {m.name: m for m in (
    ThresholdMethod("eer", _eer, {}, "the paper's: the calibration ROC point where the "
                    "false-positive and false-negative rates meet (a calibration score)", False),
    ThresholdMethod("eer_midpoint", _eer_midpoint, {}, "the paper's EER point, its threshold "
                    "halfway (in log-odds) down to the next lower calibration score", True),
    ThresholdMethod("eer_smoothed", _eer_smoothed, {"bandwidth": 1.0}, "EER of the ROC of "
                    "Gaussian-kernel smoothed class densities of the log-odds", True),
    ThresholdMethod("eer_binormal", _eer_binormal, {}, "EER of the ROC of normal "
                    "distributions fitted to each class's log-odds", True),
    ThresholdMethod("bootstrap_eer", _bootstrap_eer, {"resamples": 201, "seed": 0},
                    "median EER threshold over class-stratified bootstrap resamples", False),
    ThresholdMethod("youden", _youden, {}, "the calibration ROC point with the largest "
                    "sensitivity + specificity - 1 (a calibration score)", False),
)}
# The default of jobs/calibrate.py and build_calibration: the method that transferred best from
# small calibration sets in benchmarks/compare_thresholds.py (README, "Threshold methods").
DEFAULT_THRESHOLD_METHOD = "eer_binormal"


def method_params(method: str, params: dict | None = None) -> dict:
    """The method's parameters: its defaults with `params` over them; unknown names refused."""
    if method not in THRESHOLD_METHODS:
        raise CalibrationError(f"unknown threshold method {method!r}; choose one of "
                               f"{sorted(THRESHOLD_METHODS)}")
    defaults = THRESHOLD_METHODS[method].defaults
    unknown = sorted(set(params or {}) - set(defaults))
    if unknown:
        raise CalibrationError(f"threshold method {method!r} takes no parameter(s) {unknown}; "
                               f"its parameters: {sorted(defaults) or 'none'}")
    return {**defaults, **(params or {})}


def log_odds(scores: Sequence[float]) -> np.ndarray:
    """logit(score), scores clipped to [LOGIT_CLIP, 1 - LOGIT_CLIP] so 0 and 1 stay finite."""
    return logit(np.clip(np.asarray(scores, dtype=float), LOGIT_CLIP, 1.0 - LOGIT_CLIP))


def fit_threshold(labels: Sequence[int], scores: Sequence[float], method: str = "eer",
                  params: dict | None = None) -> float:
    """The `method` threshold of these calibration scores, on the score scale (predict
    `score >= threshold`). Log-odds methods work on logit(score) when every score is a
    probability and on the scores themselves otherwise (a classifier's margins)."""
    chosen, full = THRESHOLD_METHODS.get(method), method_params(method, params)
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    _check_both_classes(y)
    if not (chosen.on_log_odds and s.min() >= 0.0 and s.max() <= 1.0):
        return float(chosen.fit(y, s, full))
    return float(expit(chosen.fit(y, log_odds(s), full)))
