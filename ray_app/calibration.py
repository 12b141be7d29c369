"""Equal-error-rate thresholds, stored per condition (and level) in a versioned JSON file.

A calibration only holds for the model, prompt and definition it was made with: applying it to
scores from anything else is refused, because thresholds sit near 0.9-0.99 where small shifts
in the score distribution flip many labels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from ray_app.provenance import code_version, utc_now

FORMAT_VERSION = 1


class CalibrationError(ValueError):
    """A calibration cannot be made, read, or applied to these scores."""


@dataclass(frozen=True)
class ThresholdEntry:
    condition: str
    level: str | None
    threshold: float
    n: int
    positives: int
    auroc: float
    eer: float


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

    @property
    def calibration_id(self) -> str:
        payload = json.dumps(self.to_dict(), sort_keys=True)
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
        except (OSError, json.JSONDecodeError) as err:
            raise CalibrationError(f"cannot read calibration file {path}: {err}") from err
        if data.pop("format_version", None) != FORMAT_VERSION:
            raise CalibrationError(f"{path}: not a ray_app calibration (format {FORMAT_VERSION})")
        data.pop("calibration_id", None)
        try:
            data["entries"] = tuple(ThresholdEntry(**e) for e in data["entries"])
            return cls(**data)
        except (KeyError, TypeError) as err:
            raise CalibrationError(f"{path}: incomplete or unknown fields: {err}") from err


def eer_threshold(labels: Sequence[int], scores: Sequence[float]) -> tuple[float, float]:
    """(threshold, eer): the ROC point where false-positive rate = false-negative rate.

    `score >= threshold` reproduces that ROC point exactly. Where no point has FPR = FNR the
    closest one is taken, and the EER is the mean of its two rates.
    """
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    if y.min(initial=1) == y.max(initial=0) or len(y) < 2:
        raise CalibrationError(
            f"an EER threshold needs both positives and negatives (got {int(y.sum())} positives "
            f"of {len(y)})"
        )
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    fnr = 1.0 - tpr
    finite = np.isfinite(thresholds)  # roc_curve's first threshold is +inf (nothing positive)
    gaps = np.where(finite, np.abs(fpr - fnr), np.inf)
    best = int(np.argmin(gaps))
    return float(thresholds[best]), float((fpr[best] + fnr[best]) / 2)


def threshold_entry(
    condition: str, level: str | None, labels: Sequence[int], scores: Sequence[float]
) -> ThresholdEntry:
    threshold, eer = eer_threshold(labels, scores)
    return ThresholdEntry(
        condition=condition,
        level=level,
        threshold=threshold,
        n=len(labels),
        positives=int(np.sum(labels)),
        auroc=float(roc_auc_score(labels, scores)),
        eer=eer,
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


def build_calibration(labels: pd.DataFrame, truth: pd.DataFrame) -> Calibration:
    """Thresholds for every (condition, level) of `labels` that `truth` covers with both classes.

    `labels`: rows of the labelling job (report_id, condition, level, score, model, method,
    prompt_hash, definition_hash, engine). `truth`: report_id, condition, level, label (0/1);
    an empty level means the report-level question.
    """
    setups = labels[["model", "method", "prompt_hash"]].drop_duplicates()
    if len(setups) != 1:
        raise CalibrationError(f"scores come from {len(setups)} setups; calibrate one at a time")
    joined = join_truth(labels, truth)
    entries = []
    for (condition, level), group in joined.groupby(["condition", "level"], sort=True):
        if group["label"].nunique() < 2:
            continue  # one class only: no ROC curve; the level stays uncalibrated
        entries.append(threshold_entry(condition, level or None, group["label"].astype(int),
                                       group["score"]))
    if not entries:
        raise CalibrationError("no (condition, level) has both positive and negative labels")
    setup = setups.iloc[0]
    definitions = labels.drop_duplicates("condition").set_index("condition")["definition_hash"]
    return Calibration(
        model=setup["model"], method=setup["method"], prompt_hash=setup["prompt_hash"],
        definition_hashes={str(k): str(v) for k, v in definitions.items()},
        entries=tuple(entries), engine=str(labels["engine"].iloc[0]),
    )
