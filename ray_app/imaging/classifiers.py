"""Classifiers on disc embeddings: a linear SVM per disc (level-specific labels, e.g. stenosis)
and a normalised-set-kernel SVM per scan (scan labels, e.g. cancer: multiple-instance learning
over the scan's discs). Both standardise embeddings, balance classes, take the equal-error-rate
threshold on a validation split and report metrics on a test split; studies never straddle
splits. Saved as a folder: model.joblib (scikit-learn objects, a pickle: load only your own)
and classifier.json (threshold, metrics, embedding settings, provenance)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import joblib
import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from ray_app.evaluation.metrics import binary_metrics
from ray_app.evaluation.thresholds import eer_threshold
from ray_app.provenance import code_version, utc_now

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def nsk_kernel(bags_a: Sequence[np.ndarray], bags_b: Sequence[np.ndarray]) -> np.ndarray:
    """Normalised set kernel with a linear base kernel: K[i, j] = mean over x in A_i, y in B_j of
    <x, y>, computed from the disc-by-disc Gram matrix (each bag: (discs, features))."""
    gram = np.concatenate(bags_a) @ np.concatenate(bags_b).T
    return _bag_averager(bags_a) @ gram @ _bag_averager(bags_b).T


def _bag_averager(bags: Sequence[np.ndarray]) -> np.ndarray:
    """(bags, discs) matrix whose row i averages the rows of bag i."""
    sizes = [len(b) for b in bags]
    if min(sizes, default=1) == 0:
        raise ValueError("a bag (scan) with no disc embeddings cannot be classified")
    averager = np.zeros((len(bags), sum(sizes)))
    start = 0
    for i, size in enumerate(sizes):
        averager[i, start:start + size] = 1.0 / size
        start += size
    return averager


class DiscSVM:
    """Standardised linear SVM on single disc embeddings."""

    kind = "disc"

    def __init__(self, c: float = 1.0, seed: int = 0):
        self.model = make_pipeline(StandardScaler(), LinearSVC(
            C=c, class_weight="balanced", max_iter=20000, random_state=seed))

    def fit(self, features: np.ndarray, labels: np.ndarray) -> "DiscSVM":
        self.model.fit(features, labels)
        return self

    def scores(self, features: np.ndarray) -> np.ndarray:
        return self.model.decision_function(features)


class NSKSVM:
    """SVM with a precomputed normalised set kernel over standardised disc embeddings; keeps the
    training bags, which the kernel of a new scan needs."""

    kind = "scan"

    def __init__(self, c: float = 1.0, seed: int = 0):
        self.scaler = StandardScaler()
        self.svm = SVC(C=c, kernel="precomputed", class_weight="balanced", random_state=seed)
        self.train_bags: list[np.ndarray] = []

    def fit(self, bags: Sequence[np.ndarray], labels: np.ndarray) -> "NSKSVM":
        self.scaler.fit(np.concatenate(bags))
        self.train_bags = [self.scaler.transform(b) for b in bags]
        self.svm.fit(nsk_kernel(self.train_bags, self.train_bags), labels)
        return self

    def scores(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        scaled = [self.scaler.transform(b) for b in bags]
        return self.svm.decision_function(nsk_kernel(scaled, self.train_bags))


@dataclass
class TrainedClassifier:
    """A fitted model with its threshold and the record of how it was made."""

    model: DiscSVM | NSKSVM
    condition: str
    threshold: float
    metrics: dict[str, dict] = field(default_factory=dict)
    embedding_settings: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.model.kind

    def predict(self, inputs) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels = scores >= threshold) for disc features or scan bags."""
        scores = self.model.scores(inputs)
        return scores, scores >= self.threshold

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        joblib.dump(self.model, folder / "model.joblib")
        record = {"format_version": FORMAT_VERSION, "kind": self.kind, "condition": self.condition,
                  "threshold": self.threshold, "metrics": self.metrics,
                  "embedding_settings": self.embedding_settings, "provenance": self.provenance}
        (folder / "classifier.json").write_text(json.dumps(record, indent=2, default=_plain))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "TrainedClassifier":
        folder = Path(folder)
        try:
            record = json.loads((folder / "classifier.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{folder} is not a saved MRI classifier (classifier.json: {err}); "
                             "train one with jobs/train_mri_classifier.py") from err
        if record.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder}: classifier format {record.get('format_version')}, "
                             f"this code reads {FORMAT_VERSION}")
        return cls(joblib.load(folder / "model.joblib"), record["condition"], record["threshold"],
                   record["metrics"], record["embedding_settings"], record["provenance"])


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in classifier.json")


@dataclass(frozen=True)
class SplitConfig:
    """How studies are split; fractions of studies, stratified by a per-study label."""

    validation: float = field(default=0.2, metadata={"doc": "Fraction of studies for the threshold."})
    test: float = field(default=0.2, metadata={"doc": "Fraction of studies for the reported metrics."})
    seed: int = field(default=0, metadata={"doc": "Random seed of the split."})


def split_studies(study_labels: dict[str, int], cfg: SplitConfig = SplitConfig()
                  ) -> dict[str, list[str]]:
    """{'train': [...], 'validation': [...], 'test': [...]} study ids, stratified when every
    part can hold both classes."""
    studies = sorted(study_labels)
    strata = [study_labels[s] for s in studies]
    held_out = cfg.validation + cfg.test
    train, rest, _, rest_strata = train_test_split(
        studies, strata, test_size=held_out, random_state=cfg.seed, stratify=_stratify(strata))
    validation, test = train_test_split(
        rest, test_size=cfg.test / held_out, random_state=cfg.seed, stratify=_stratify(rest_strata))
    return {"train": sorted(train), "validation": sorted(validation), "test": sorted(test)}


def _stratify(strata: list[int]) -> list[int] | None:
    counts = np.bincount(np.asarray(strata, dtype=int), minlength=2)
    return strata if counts.min() >= 2 else None


def fit_and_calibrate(model: DiscSVM | NSKSVM, parts: dict[str, tuple[object, np.ndarray]],
                      condition: str, provenance: dict, settings: dict) -> TrainedClassifier:
    """Fit on 'train', EER threshold on 'validation', metrics on every part (test included)."""
    features, labels = parts["train"]
    _require_both_classes("train", labels)
    model.fit(features, labels)
    val_features, val_labels = parts["validation"]
    _require_both_classes("validation", val_labels)
    threshold, _ = eer_threshold(val_labels, model.scores(val_features))
    metrics = {name: binary_metrics(y, model.scores(x), threshold)
               for name, (x, y) in parts.items() if len(y)}
    log.info("%s %s classifier: threshold %.4f; test %s", condition, model.kind, threshold,
             {k: round(v, 3) for k, v in metrics.get("test", {}).items() if isinstance(v, float)})
    record = {**provenance, "code_version": code_version(), "created_at": utc_now(),
              "model": type(model).__name__, "model_params": _params(model)}
    return TrainedClassifier(model, condition, threshold, metrics, settings, record)


def _params(model: DiscSVM | NSKSVM) -> dict:
    estimator = model.svm if isinstance(model, NSKSVM) else model.model[-1]
    return {"C": estimator.C, "class_weight": estimator.class_weight}


def _require_both_classes(part: str, labels: np.ndarray) -> None:
    if len(set(np.asarray(labels).tolist())) < 2:
        raise ValueError(f"the {part} split has only one class ({len(labels)} examples); use more "
                         "studies, or change the split fractions or seed")
