"""Evaluate labelling runs against hand labels, side by side, with bootstrap intervals.

Every run (direct vs summary query, two models, two prompt variants, the rule baseline) is
judged on the same reports: a seeded split of the hand-labelled reports picks each run's EER
threshold on the calibration part (or a stored calibration supplies it), and the metrics come
from the evaluation part. Plain pandas and scikit-learn; the Markdown and plots are in
evaluation_report.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from ray_app.evaluation.calibration import Calibration, CalibrationError, join_truth
from ray_app.evaluation.metrics import METRICS, binary_metrics, bootstrap_intervals
from ray_app.evaluation.thresholds import fit_threshold


@dataclass(frozen=True)
class EvaluationConfig:
    calibration_fraction: float = field(default=0.3, metadata={
        "doc": "Share of hand-labelled reports used to choose thresholds; metrics on the rest."})
    seed: int = field(default=0, metadata={"doc": "Seed of the split and of the bootstrap."})
    bootstrap: int = field(default=1000, metadata={"doc": "Bootstrap resamples per metric."})
    confidence: float = field(default=0.95, metadata={"doc": "Width of the intervals."})
    threshold_method: str = field(default="eer", metadata={
        "doc": "How each run's threshold is chosen on the calibration part (one of "
               "thresholds.THRESHOLD_METHODS; eer is the paper's, jobs/calibrate.py's default "
               "is thresholds.DEFAULT_THRESHOLD_METHOD)."})


@dataclass
class Run:
    """One labelling run: a name for the tables and its label rows."""

    name: str
    labels: pd.DataFrame
    calibration: Calibration | None = None  # stored thresholds instead of the split's


def split_reports(truth: pd.DataFrame, fraction: float, seed: int) -> tuple[set, set]:
    """(calibration ids, evaluation ids): a seeded shuffle of the hand-labelled report ids,
    stratified so that every (condition, level) with at least two positives has about
    `fraction` of them (at least one) on the calibration side: a rare finding whose positives
    all fell on the evaluation side would get no threshold."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"calibration fraction {fraction} must be in [0, 1)")
    ids = np.array(sorted(truth["report_id"].astype(str).unique()))
    np.random.default_rng(seed).shuffle(ids)
    cut = int(round(len(ids) * fraction))
    rank = {report_id: k for k, report_id in enumerate(ids)}
    chosen: list[str] = []
    for positives in _positive_ids_rarest_first(truth):
        want = max(1, int(round(len(positives) * fraction))) if len(positives) >= 2 else 0
        missing = want - len(positives.intersection(chosen))
        chosen += sorted(positives.difference(chosen), key=rank.get)[: max(0, missing)]
    taken = set(chosen)
    calibration = set((chosen + [i for i in ids if i not in taken])[:cut])
    return calibration, set(ids) - calibration


def _positive_ids_rarest_first(truth: pd.DataFrame) -> list[set]:
    positive = truth[truth["label"].astype(int) == 1].assign(
        report_id=lambda t: t["report_id"].astype(str))
    groups = positive.groupby(["condition", "level"], sort=True)["report_id"].apply(set)
    return sorted(groups.tolist(), key=len)


def evaluate_runs(runs: list[Run], truth: pd.DataFrame, cfg: EvaluationConfig) -> pd.DataFrame:
    """One row per (run, condition, level): n, positives, threshold, every metric with its
    interval (`<metric>_low`, `<metric>_high`), and where the threshold came from."""
    calibration_ids, evaluation_ids = split_reports(truth, cfg.calibration_fraction, cfg.seed)
    rows = []
    for run in runs:
        joined = join_truth(run.labels, truth)
        if joined.empty:
            raise CalibrationError(f"run {run.name!r} shares no (report, condition, level) with "
                                   "the hand labels: check report ids and condition names")
        for (condition, level), group in joined.groupby(["condition", "level"], sort=True):
            threshold, source = _threshold(run, condition, level, group, calibration_ids,
                                           cfg.threshold_method)
            held_out = group[group["report_id"].isin(evaluation_ids)]
            if threshold is None:  # listed with the reason, not silently left out
                rows.append(_unevaluated_row(run.name, condition, level, held_out, source))
                continue
            rows.append(_metrics_row(run.name, condition, level, held_out, threshold, source, cfg))
    return pd.DataFrame(rows)


def _unevaluated_row(run: str, condition: str, level: str, rows: pd.DataFrame,
                     reason: str) -> dict:
    nan = float("nan")
    row = {"run": run, "condition": condition, "level": level, "n": len(rows),
           "positives": int(rows["label"].astype(int).sum()), "threshold": nan,
           "threshold_source": f"not evaluated: {reason}"}
    for metric in METRICS:
        row[metric] = row[f"{metric}_low"] = row[f"{metric}_high"] = nan
    if rows["label"].nunique() == 2:  # ranking needs no threshold
        row["auroc"] = float(roc_auc_score(rows["label"].astype(int), rows["score"]))
    return row


def _threshold(run: Run, condition: str, level: str, group: pd.DataFrame,
               calibration_ids: set, method: str = "eer") -> tuple[float | None, str]:
    if run.calibration is not None:
        entry = run.calibration.entry(condition, level or None)
        if entry is None:
            return None, "not in the stored calibration"
        return entry.threshold, run.calibration.calibration_id
    part = group[group["report_id"].isin(calibration_ids)]
    if part["label"].nunique() < 2:
        counts = part["label"].astype(int).value_counts().to_dict()
        return None, (f"the calibration part ({len(part)} reports) has {counts.get(1, 0)} "
                      f"positives and {counts.get(0, 0)} negatives, so no EER threshold: label "
                      "more reports, raise --calibration-fraction or give --calibration")
    name = "EER" if method == "eer" else method
    return fit_threshold(part["label"].astype(int), part["score"], method), \
        f"{name} on {len(part)} calibration reports"


def _metrics_row(run: str, condition: str, level: str, rows: pd.DataFrame, threshold: float,
                 source: str, cfg: EvaluationConfig) -> dict:
    labels, scores = rows["label"].astype(int).to_numpy(), rows["score"].to_numpy()
    point = binary_metrics(labels, scores, threshold)
    if 0 < point["positives"] < point["n"]:
        intervals = bootstrap_intervals(labels, scores, threshold, cfg.bootstrap, cfg.seed,
                                        cfg.confidence)
    else:
        intervals = {m: (float("nan"), float("nan")) for m in METRICS}
    row = {"run": run, "condition": condition, "level": level, **point,
           "threshold_source": source}
    for metric, (low, high) in intervals.items():
        row[f"{metric}_low"], row[f"{metric}_high"] = low, high
    return row


def scored_rows(run: Run, truth: pd.DataFrame, evaluation_ids: set) -> pd.DataFrame:
    """The evaluation part of a run joined with its hand labels (for plots)."""
    joined = join_truth(run.labels, truth)
    return joined[joined["report_id"].isin(evaluation_ids)]

