"""From DICOM files and disc locations to disc volumes, study by study: the steps the embedding
job and the prediction function share."""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import pandas as pd

from ray_app.imaging.dicom_series import (
    SelectionRule,
    Series,
    choose_per_study,
    group_series,
    load_volume,
)
from ray_app.imaging.dicom_store import DicomStore, FileError, SliceHeader, scan_headers
from ray_app.imaging.disc_volumes import DiscVolume, disc_volumes
from ray_app.imaging.embeddings import DiscEmbedder

log = logging.getLogger(__name__)


def series_by_study(headers: list[SliceHeader]) -> tuple[dict[str, list[Series]], list[FileError]]:
    series, errors = group_series(headers)
    grouped: dict[str, list[Series]] = defaultdict(list)
    for s in series:
        grouped[s.study_uid].append(s)
    return dict(grouped), errors


def find_studies(store: DicomStore) -> tuple[dict[str, list[Series]], list[FileError]]:
    """Every study's series (slices in spatial order) and the files left out, with reasons."""
    headers, errors = scan_headers(store)
    grouped, more = series_by_study(headers)
    return grouped, errors + more


def series_for_locations(study_series: list[Series], locations: pd.DataFrame,
                         rule: SelectionRule) -> tuple[Series | None, str | None]:
    """The series to cut discs from: the one the locations name (their pixel coordinates only
    hold there), else the rule's choice. Returns (series, None) or (None, reason)."""
    named = {str(u) for u in locations["series_uid"].dropna() if str(u).strip() not in ("", "*")}
    if len(named) > 1:
        return None, f"locations name {len(named)} series of one study; give one series per study"
    chosen, errors = choose_per_study(study_series, rule)
    if not named:
        return (next(iter(chosen.values())), None) if chosen else (None, errors[0].reason)
    uid = named.pop()
    match = next((s for s in study_series if s.series_uid == uid), None)
    if match is None:
        return None, f"the locations' series {uid} is not among the study's readable series"
    picked = next(iter(chosen.values()), None)
    if picked is not None and picked.series_uid != uid:
        log.info("study %s: using series %s named by the locations (rule would pick %s)",
                 match.study_uid, uid, picked.series_uid)
    return match, None


def study_disc_volumes(store: DicomStore, study_series: list[Series], locations: pd.DataFrame,
                       rule: SelectionRule, crop_shape: tuple[int, int, int],
                       target_spacing_mm: float | None) -> tuple[list[DiscVolume], list[FileError]]:
    """Disc volumes of one study (`locations`: its rows of the locations table), with the
    problems found on the way as FileErrors (named by file, or by 'study <uid>')."""
    study_uid = study_series[0].study_uid
    series, reason = series_for_locations(study_series, locations, rule)
    if series is None:
        return [], [FileError(f"study {study_uid}", reason or "no series", study_uid, None)]
    volume, errors = load_volume(store, series)
    if volume is None:
        errors.append(FileError(f"study {study_uid}", "no slice of the series could be decoded",
                                study_uid, series.series_uid))
        return [], errors
    discs, problems = disc_volumes(volume, locations, crop_shape, target_spacing_mm)
    errors += [FileError(f"study {study_uid}", f"disc {p}", study_uid, series.series_uid)
               for p in problems]
    return discs, errors


def embed_studies(store: DicomStore, locations: pd.DataFrame, embedder: DiscEmbedder,
                  rule: SelectionRule, crop_shape: tuple[int, int, int],
                  target_spacing_mm: float | None) -> tuple[pd.DataFrame, list[FileError]]:
    """In one process, what the embedding job does on Ray: rows of study_uid, series_uid,
    level, embedding for every located disc, and the problems met."""
    grouped, errors = find_studies(store)
    rows = []
    for study_uid, study_locations in locations.groupby("study_uid"):
        if study_uid not in grouped:
            errors.append(FileError(f"study {study_uid}", "no readable images", study_uid, None))
            continue
        discs, more = study_disc_volumes(store, grouped[study_uid], study_locations, rule,
                                         crop_shape, target_spacing_mm)
        errors += more
        if discs:
            vectors = embedder.embed(np.stack([d.pixels for d in discs]))
            rows += [{"study_uid": d.study_uid, "series_uid": d.series_uid, "level": d.level,
                      "embedding": v} for d, v in zip(discs, vectors)]
    return pd.DataFrame(rows, columns=["study_uid", "series_uid", "level", "embedding"]), errors
