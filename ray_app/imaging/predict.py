"""Predictions for one study: DICOM files (a folder, paths or bytes) and its disc locations in,
per-disc and per-scan scores and labels out, from saved classifiers. A pure function: the Ray
Serve endpoint /v1/mri/predict wraps it."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ray_app.imaging.classifiers import TrainedClassifier
from ray_app.imaging.dicom_series import SelectionRule
from ray_app.imaging.dicom_store import DicomStore
from ray_app.imaging.disc_volumes import normalise_locations
from ray_app.imaging.embeddings import (
    DiscEmbedder,
    EmbeddingSettings,
    random_weights_seed,
)
from ray_app.imaging.studies import find_studies, study_disc_volumes

log = logging.getLogger(__name__)


class PredictionError(ValueError):
    """The study cannot be classified; the message says why."""


def embedder_for(settings: EmbeddingSettings, weights: str | None = None,
                 device: str | None = None) -> DiscEmbedder:
    """The encoder a classifier was trained on: the same weights file (checked by hash) or the
    same random seed."""
    seed = random_weights_seed(settings.weights_id)
    embedder = DiscEmbedder(weights, allow_random=seed is not None, image_size=settings.image_size,
                            device=device, seed=seed or 0)
    if embedder.weights_id != settings.weights_id:
        raise PredictionError(f"the classifier was trained on embeddings from {settings.weights_id}"
                              f", but the encoder here has {embedder.weights_id}; pass that weights file")
    return embedder


def predict_study(study: str | Path | Sequence[str | bytes], locations: pd.DataFrame,
                  classifiers: Sequence[TrainedClassifier], embedder: DiscEmbedder | None = None,
                  rule: SelectionRule = SelectionRule()) -> dict:
    """{'study_uid', 'series_uid', 'predictions': [per classifier: condition, kind, threshold,
    scan {score, label}, discs [{level, score, label}]], 'errors': [{name, reason}]}.

    `study`: a folder or a list of file paths / file contents holding one study.
    `locations`: the study's disc locations (either layout of disc_volumes). For a disc
    classifier the scan score is the highest disc score; for an NSK classifier only the scan
    is scored. Every classifier must share one set of embedding settings."""
    if not classifiers:
        raise PredictionError("no classifier given")
    settings = common_settings(classifiers)
    store = DicomStore.from_uri(str(study)) if isinstance(study, (str, Path)) else DicomStore.from_items(study)
    grouped, errors = find_studies(store)
    if len(grouped) != 1:
        raise PredictionError(f"expected the files of one study, found {len(grouped)} studies "
                              f"({len(errors)} files unusable: {[e.reason for e in errors[:3]]})")
    (study_uid, study_series), = grouped.items()
    locs = normalise_locations(locations)
    locs = locs[locs["study_uid"] == study_uid]
    if locs.empty:
        raise PredictionError(f"the locations table has no disc of study {study_uid}")
    discs, more = study_disc_volumes(store, study_series, locs, rule, settings.crop_shape,
                                     settings.target_spacing_mm)
    errors += more
    if not discs:
        raise PredictionError(f"no disc volume could be cut from study {study_uid}: "
                              f"{[e.reason for e in errors][-3:]}")
    embedder = embedder or embedder_for(settings)
    embeddings = embedder.embed(np.stack([d.pixels for d in discs]))
    levels = [d.level for d in discs]
    return {"study_uid": study_uid, "series_uid": discs[0].series_uid,
            "predictions": [_predict_one(c, levels, embeddings) for c in classifiers],
            "errors": [{"name": e.name, "reason": e.reason} for e in errors]}


def common_settings(classifiers: Sequence[TrainedClassifier]) -> EmbeddingSettings:
    settings = {EmbeddingSettings.from_dict(c.embedding_settings) for c in classifiers}
    if len(settings) != 1:
        raise PredictionError("the classifiers were trained on differently made embeddings "
                              f"({[asdict(s) for s in settings]}); predict with each separately")
    return settings.pop()


def _predict_one(classifier: TrainedClassifier, levels: list[str], embeddings: np.ndarray) -> dict:
    result = {"condition": classifier.condition, "kind": classifier.kind,
              "threshold": classifier.threshold}
    if classifier.kind == "scan":
        scores, labels = classifier.predict([embeddings])
        return {**result, "scan": {"score": float(scores[0]), "label": bool(labels[0])}, "discs": []}
    scores, labels = classifier.predict(embeddings)
    top = int(np.argmax(scores))
    discs = [{"level": lvl, "score": float(s), "label": bool(y)}
             for lvl, s, y in zip(levels, scores, labels)]
    return {**result, "scan": {"score": float(scores[top]), "label": bool(labels.any())},
            "discs": discs}
