"""Thresholds, stored per condition (and level) in a versioned JSON file.

The threshold comes from one of thresholds.THRESHOLD_METHODS (recorded in the file with its
parameters): the paper's equal-error-rate point of the calibration ROC (`eer`), or steadier
estimates of it that transfer better from a calibration set with a handful of positives (see
benchmarks/compare_thresholds.py for the measurement behind DEFAULT_THRESHOLD_METHOD).

A calibration only holds for the model, prompt and definition it was made with: applying it to
scores from anything else is refused, because thresholds sit near 0.9-0.99 where small shifts
in the score distribution flip many labels.

Besides the EER threshold each entry may carry an uncertainty band: below `band_low` (the
threshold reaching the target sensitivity) a report is a confident negative, at or above
`band_high` (the threshold reaching the target specificity) a confident positive, and in between
it is `uncertain`: train on the confident rows, send the rest to a person.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from ray_app.evaluation.thresholds import (
    DEFAULT_THRESHOLD_METHOD,
    THRESHOLD_METHODS,
    CalibrationError,
    eer_threshold,
    fit_threshold,
    method_params,
)
from ray_app.provenance import code_version, utc_now

# Version 1 files have no uncertainty band. Format 2 gained threshold_method/threshold_params
# later, as optional fields: a file without them was made by the paper's rule, `eer`.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_TARGET = 0.95


@dataclass(frozen=True)
class ThresholdEntry:
    condition: str
    level: str | None
    threshold: float
    n: int
    positives: int
    auroc: float
    eer: float
    band_low: float | None = None
    band_high: float | None = None
    target_sensitivity: float | None = None
    target_specificity: float | None = None
    band_note: str | None = None  # why there is no band, when there is none

    def is_uncertain(self, score: float) -> bool | None:
        """True inside the band, False outside, None when this entry has no band."""
        if self.band_low is None or self.band_high is None:
            return None
        return self.band_low <= score < self.band_high


@dataclass(frozen=True)
class Calibration:
    """Thresholds plus what they are valid for."""

    model: str
    method: str
    prompt_hash: str
    definition_hashes: dict[str, str]
    entries: tuple[ThresholdEntry, ...]
    engine: str = ""
    created_at: str = field(default_factory=utc_now)
    code_version: str = field(default_factory=code_version)
    threshold_method: str = "eer"  # files made before threshold methods existed are the paper's
    threshold_params: dict = field(default_factory=dict)

    @property
    def calibration_id(self) -> str:
        data = self.to_dict()
        if self.threshold_method == "eer" and not self.threshold_params:
            # The paper's rule keeps the id it had before threshold methods were recorded:
            # output folders labelled with an older file still resume (label_job.check_resume
            # compares calibration ids).
            del data["threshold_method"], data["threshold_params"]
        payload = json.dumps(data, sort_keys=True)
        return "cal-" + hashlib.sha256(payload.encode()).hexdigest()[:12]

    def entry(self, condition: str, level: str | None) -> ThresholdEntry | None:
        for e in self.entries:
            if e.condition == condition and e.level == level:
                return e
        return None

    def check_applies(self, model: str, prompt_hash: str, condition: str, definition_hash: str):
        """Raise CalibrationError unless these thresholds were made for exactly this setup."""
        problems = []
        if model != self.model:
            problems.append(f"model {model!r} (calibrated: {self.model!r})")
        if prompt_hash != self.prompt_hash:
            problems.append(f"prompt hash {prompt_hash} (calibrated: {self.prompt_hash})")
        calibrated = self.definition_hashes.get(condition)
        if calibrated is None:
            problems.append(f"condition {condition!r} (not in this calibration)")
        elif calibrated != definition_hash:
            problems.append(f"definition of {condition!r} changed since calibration")
        if problems:
            raise CalibrationError(
                f"calibration {self.calibration_id} does not apply to: {'; '.join(problems)}. "
                "Recalibrate with jobs/calibrate.py for this model, prompt and definition, or "
                "run without --calibration to get scores only"
            )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION
        return data

    def save(self, path: str | Path) -> None:
        data = {**self.to_dict(), "calibration_id": self.calibration_id}
        # repr-exact floats: json writes the shortest string that round-trips a float64.
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as err:
            raise CalibrationError(f"cannot read calibration file {path}: "
                                   f"{err.strerror or err}; check --calibration") from err
        except (UnicodeDecodeError, json.JSONDecodeError) as err:  # binary, or text not JSON
            raise CalibrationError(f"cannot read calibration file {path}: not JSON ({err}); "
                                   "pass the JSON file that jobs/calibrate.py wrote") from err
        if not isinstance(data, dict) or data.pop("format_version", None) not in READABLE_VERSIONS:
            raise CalibrationError(f"{path}: not a ray_app calibration (formats "
                                   f"{READABLE_VERSIONS}); make one with jobs/calibrate.py")
        data.pop("calibration_id", None)
        try:
            data["entries"] = tuple(ThresholdEntry(**e) for e in data["entries"])
            return cls(**data)
        except (KeyError, TypeError) as err:
            raise CalibrationError(f"{path}: incomplete or unknown fields: {err}") from err


def band_thresholds(labels: Sequence[int], scores: Sequence[float], eer_cut: float,
                    target_sensitivity: float, target_specificity: float) -> tuple[float, float]:
    """(low, high): the highest threshold whose sensitivity reaches the target and the lowest
    whose specificity does, widened if needed so that low <= eer_cut <= high.

    The widening matters for a strong classifier, where the sensitivity target is met above
    the specificity one: the band then shrinks to nothing around the EER threshold rather
    than turning inside out."""
    for name, target in (("sensitivity", target_sensitivity), ("specificity", target_specificity)):
        if not 0.5 <= target < 1.0:
            raise CalibrationError(f"target {name} {target} must be in [0.5, 1)")
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    # thresholds fall and tpr/fpr rise along the curve; the slack keeps 18/20 >= 0.9 true
    # although 1 - 0.9 is 0.0999... in floating point
    slack = 1e-9
    low = thresholds[np.flatnonzero(finite & (tpr >= target_sensitivity - slack))[0]]
    high = thresholds[np.flatnonzero(finite & (fpr <= 1.0 - target_specificity + slack))[-1]]
    return float(min(low, eer_cut)), float(max(high, eer_cut))


def band_too_small(positives: int, negatives: int, target_sensitivity: float,
                   target_specificity: float) -> str | None:
    """Why this set cannot place the band, or None. Reaching sensitivity t means missing at most
    a fraction 1 - t of positives: with fewer than 1 / (1 - t) positives even one miss is too
    many, so the 'target' threshold is just the lowest positive score."""
    needed_pos = math.ceil(1.0 / (1.0 - target_sensitivity) - 1e-9)
    needed_neg = math.ceil(1.0 / (1.0 - target_specificity) - 1e-9)
    if positives >= needed_pos and negatives >= needed_neg:
        return None
    return (f"no uncertainty band: a {target_sensitivity:g} sensitivity / {target_specificity:g} "
            f"specificity band needs at least {needed_pos} positives and {needed_neg} negatives, "
            f"this calibration set has {positives} and {negatives}; label more reports or lower "
            "the targets")


def threshold_entry(
    condition: str, level: str | None, labels: Sequence[int], scores: Sequence[float],
    target_sensitivity: float = DEFAULT_TARGET, target_specificity: float = DEFAULT_TARGET,
    method: str = DEFAULT_THRESHOLD_METHOD, params: dict | None = None,
) -> ThresholdEntry:
    """The `method` threshold with the calibration set's AUROC, empirical EER and band."""
    eer = eer_threshold(labels, scores)[1]
    threshold = fit_threshold(labels, scores, method, params)
    positives = int(np.sum(labels))
    note = band_too_small(positives, len(labels) - positives, target_sensitivity,
                          target_specificity)
    low, high = (None, None) if note else band_thresholds(
        labels, scores, threshold, target_sensitivity, target_specificity)
    return ThresholdEntry(
        condition=condition,
        level=level,
        threshold=threshold,
        n=len(labels),
        positives=positives,
        auroc=float(roc_auc_score(labels, scores)),
        eer=eer,
        band_low=low,
        band_high=high,
        target_sensitivity=target_sensitivity,
        target_specificity=target_specificity,
        band_note=note,
    )


TRUTH_KEY = ["report_id", "condition", "level"]


def join_truth(scores: pd.DataFrame, truth: pd.DataFrame, how: str = "inner") -> pd.DataFrame:
    """Scores next to the known label on (report_id, condition, level); an empty or missing
    level is the report-level question. Only `score` is taken from `scores`: the job's own
    `label` column (set when it ran with a calibration) would collide with the truth's."""
    truth = truth.assign(level=truth["level"].fillna("").astype(str),
                         report_id=truth["report_id"].astype(str))
    scored = scores[[*TRUTH_KEY, "score"]].assign(level=scores["level"].fillna("").astype(str))
    return scored.merge(truth[[*TRUTH_KEY, "label"]], on=TRUTH_KEY, how=how)


SETUP_COLUMNS = ("model", "engine", "method", "prompt_hash")
SOURCE_COLUMN = "source"  # optional in label rows: where they were read from (a folder)


def check_one_setup(labels: pd.DataFrame) -> None:
    """Refuse label rows made with different models, engines, methods, prompts or condition
    definitions: one calibration records one setup, and thresholds fitted on a mixture fit
    none of them. The reason names each differing value and, when the rows carry a `source`
    column (jobs/calibrate.py sets it to the folder), the folders it came from."""
    if labels.empty:
        raise CalibrationError("no label rows to calibrate")
    sources = (labels[SOURCE_COLUMN].astype(str) if SOURCE_COLUMN in labels
               else pd.Series("", index=labels.index))
    problems = []
    for column in SETUP_COLUMNS:
        if column in labels:
            problems += _differing(column, labels[column], sources)
    if "definition_hash" in labels:
        for condition, rows in labels.groupby("condition", sort=True):
            problems += _differing(f"definition of {condition}", rows["definition_hash"],
                                   sources[rows.index])
    if problems:
        raise CalibrationError(
            f"the label rows were made with different setups: {'; '.join(problems)}. A "
            "calibration holds for one model, engine, method, prompt and definition: calibrate "
            "each setup's folders separately (or relabel them with one setup)")


def _differing(what: str, values: pd.Series, sources: pd.Series) -> list[str]:
    values = values.astype(object).where(values.notna(), None)
    if values.nunique(dropna=False) < 2:
        return []
    seen: dict[object, list[str]] = {}
    for value, source in zip(values, sources):
        where = seen.setdefault(value, [])
        if source and source not in where:
            where.append(source)
    listed = [f"{value!r}" + (f" (in {', '.join(where)})" if where else "")
              for value, where in seen.items()]
    return [f"{what}: {' vs '.join(listed)}"]


def build_calibration(labels: pd.DataFrame, truth: pd.DataFrame,
                      target_sensitivity: float = DEFAULT_TARGET,
                      target_specificity: float = DEFAULT_TARGET,
                      threshold_method: str = DEFAULT_THRESHOLD_METHOD,
                      threshold_params: dict | None = None) -> Calibration:
    """Thresholds (by `threshold_method`, one of THRESHOLD_METHODS) for every (condition, level)
    of `labels` that `truth` covers with both classes.

    `labels`: rows of the labelling job (report_id, condition, level, score, model, method,
    prompt_hash, definition_hash, engine; optionally `source`), all made with one setup
    (check_one_setup). `truth`: report_id, condition, level, label (0/1); an empty level means
    the report-level question.
    """
    check_one_setup(labels)
    params = method_params(threshold_method, threshold_params)
    joined = join_truth(labels, truth)
    entries = []
    for (condition, level), group in joined.groupby(["condition", "level"], sort=True):
        if group["label"].nunique() < 2:
            continue  # one class only: no ROC curve; the level stays uncalibrated
        entries.append(threshold_entry(condition, level or None, group["label"].astype(int),
                                       group["score"], target_sensitivity, target_specificity,
                                       threshold_method, params))
    if not entries:
        raise CalibrationError("no (condition, level) has both positive and negative labels")
    setup = labels.iloc[0]
    definitions = labels.drop_duplicates("condition").set_index("condition")["definition_hash"]
    return Calibration(
        model=setup["model"], method=setup["method"], prompt_hash=setup["prompt_hash"],
        definition_hashes={str(k): str(v) for k, v in definitions.items()},
        entries=tuple(entries), engine=str(labels["engine"].iloc[0]),
        threshold_method=threshold_method, threshold_params=params,
    )


def describe(calibration: Calibration) -> str:
    """A table of the entries for logs and terminals."""
    params = ", ".join(f"{k}={v}" for k, v in sorted(calibration.threshold_params.items()))
    method = THRESHOLD_METHODS.get(calibration.threshold_method)
    thresholds = (f"thresholds: {calibration.threshold_method}"
                  + (f" ({params})" if params else "") + (f": {method.doc}" if method else ""))
    lines = [f"calibration {calibration.calibration_id}: model {calibration.model}, method "
             f"{calibration.method}, prompt {calibration.prompt_hash}", thresholds,
             f"{'condition':24} {'level':6} {'n':>5} {'pos':>4} {'AUROC':>6} {'EER':>6} "
             f"{'threshold':>18}  band"]
    for e in calibration.entries:
        band = (f"[{e.band_low:.6g}, {e.band_high:.6g})" if e.band_low is not None
                else e.band_note or "none")
        lines.append(f"{e.condition:24} {e.level or '-':6} {e.n:5d} {e.positives:4d} "
                     f"{e.auroc:6.3f} {e.eer:6.3f} {e.threshold!r:>18}  {band}")
    return "\n".join(lines)
