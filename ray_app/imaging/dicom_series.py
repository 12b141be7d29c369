"""Series from image headers: grouping by study/series UID, slice order from positions, the rule
that picks one series per study (sagittal T2 by default), and the series' pixels as a float
volume with its spacing."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ray_app.imaging.dicom_store import (
    DicomStore,
    FileError,
    SliceHeader,
    UnusableFile,
    read_dataset,
)

log = logging.getLogger(__name__)

PLANES = ("sagittal", "coronal", "axial")  # slice normal along patient x, y, z (LPS)


@dataclass
class Series:
    """The usable slices of one series, in spatial order along the slice normal."""

    study_uid: str
    series_uid: str
    slices: list[SliceHeader]

    @property
    def first(self) -> SliceHeader:
        return self.slices[0]

    @property
    def plane(self) -> str | None:
        return plane_of(self.first.orientation)

    @property
    def weighting(self) -> str:
        return weighting_of(self.first)

    def craniocaudal_extent_mm(self) -> float:
        """How far the in-plane field of view reaches along the patient's head-foot axis."""
        h = self.first
        if h.orientation is None or h.pixel_spacing is None:
            return 0.0
        row_dir, col_dir = np.array(h.orientation[:3]), np.array(h.orientation[3:])
        # Moving along a row (across columns) spans columns * column spacing, and vice versa.
        along_row = abs(row_dir[2]) * h.columns * h.pixel_spacing[1]
        along_col = abs(col_dir[2]) * h.rows * h.pixel_spacing[0]
        return float(max(along_row, along_col))


@dataclass(frozen=True)
class SelectionRule:
    """Which series to use from a study."""

    plane: str = "sagittal"
    weighting: str = "T2"
    min_slices: int = 5
    whole_spine_mm: float = field(default=400.0, metadata={
        "doc": "Craniocaudal field of view from which a series counts as whole-spine."})


@dataclass
class Volume:
    """A series' pixels as float32 (slices, rows, columns), rescaled to stored units."""

    study_uid: str
    series_uid: str
    pixels: np.ndarray
    spacing: tuple[float, float, float]  # mm between slices, rows, columns
    instance_numbers: list[int | None]

    def slice_index_of(self, instance_number: int) -> int:
        try:
            return self.instance_numbers.index(instance_number)
        except ValueError:
            raise KeyError(f"series {self.series_uid} has no instance number {instance_number}") from None


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    return np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))


def plane_of(orientation: tuple[float, ...] | None) -> str | None:
    """'sagittal', 'coronal' or 'axial' from the axis the slice normal is closest to."""
    if orientation is None:
        return None
    return PLANES[int(np.argmax(np.abs(slice_normal(orientation))))]


_TOKENS = (("STIR", "STIR"), ("T2*", "T2*"), ("T2", "T2"), ("T1", "T1"), ("PD", "PD"))


def weighting_of(h: SliceHeader) -> str:
    """'T1', 'T2', 'T2*', 'STIR', 'PD' or 'unknown': the series description when it says, else
    echo and repetition times (T2: TE >= 60 ms and TR >= 1500 ms; T1: TE <= 30 ms, TR <= 1000 ms)."""
    text = h.series_description.upper()
    for token, name in _TOKENS:
        if re.search(rf"(?<![A-Z0-9]){re.escape(token)}(?![0-9*])", text):
            return name
    te, tr = h.echo_time, h.repetition_time
    if te is None or tr is None:
        return "unknown"
    gradient_echo = "GR" in h.scanning_sequence.split("\\")
    if te >= 60 and tr >= 1500 and not gradient_echo:
        return "T2"
    if te <= 30 and tr <= 1000:
        return "T1"
    return "unknown"


def order_slices(slices: list[SliceHeader]) -> list[SliceHeader]:
    """Spatial order: ImagePositionPatient projected on the slice normal (instance numbers and
    file names are not trusted)."""
    normal = slice_normal(slices[0].orientation)  # type: ignore[arg-type]
    return sorted(slices, key=lambda h: float(np.dot(normal, h.position)))  # type: ignore[arg-type]


def group_series(headers: list[SliceHeader]) -> tuple[list[Series], list[FileError]]:
    """Series by (study, series) UID with slices in spatial order. Slices that cannot be placed
    (no position/orientation, another orientation or size than the series, multi-frame) are
    reported."""
    groups: dict[tuple[str, str], list[SliceHeader]] = defaultdict(list)
    for h in headers:
        groups[(h.study_uid, h.series_uid)].append(h)
    series, errors = [], []
    for (study, uid), members in sorted(groups.items()):
        kept, dropped = _consistent_slices(members)
        errors += [FileError(h.name, why, study, uid) for h, why in dropped]
        if kept:
            series.append(Series(study, uid, order_slices(kept)))
    return series, errors


def _consistent_slices(members: list[SliceHeader]) -> tuple[list[SliceHeader], list[tuple[SliceHeader, str]]]:
    dropped = []
    placed = []
    for h in members:
        if h.frames > 1:
            dropped.append((h, f"multi-frame image ({h.frames} frames) is not supported"))
        elif h.position is None or h.orientation is None:
            dropped.append((h, "no ImagePositionPatient/ImageOrientationPatient: cannot place the slice"))
        else:
            placed.append(h)
    if not placed:
        return [], dropped
    # The series' geometry is that of most of its slices; odd ones out are reported.
    keys = [(np.round(h.orientation, 3).tobytes(), h.rows, h.columns) for h in placed]
    common = max(set(keys), key=keys.count)
    kept = [h for h, k in zip(placed, keys) if k == common]
    dropped += [(h, "orientation or image size differs from the rest of its series")
                for h, k in zip(placed, keys) if k != common]
    return kept, dropped


def choose_series(series: list[Series], rule: SelectionRule = SelectionRule()) -> Series | None:
    """The series a study is read from: plane and weighting by `rule`; among several, the
    whole-spine ones win, and among those the latest (series date/time, then series number)."""
    candidates = [s for s in series if s.plane == rule.plane and s.weighting == rule.weighting
                  and len(s.slices) >= rule.min_slices]
    if not candidates:
        return None
    whole = [s for s in candidates if s.craniocaudal_extent_mm() >= rule.whole_spine_mm]
    pool = whole or candidates
    return max(pool, key=lambda s: (s.first.series_datetime, s.first.series_number or 0))


def choose_per_study(series: list[Series], rule: SelectionRule = SelectionRule()
                     ) -> tuple[dict[str, Series], list[FileError]]:
    """One series per study; a study with none that fits the rule is reported (by study)."""
    by_study: dict[str, list[Series]] = defaultdict(list)
    for s in series:
        by_study[s.study_uid].append(s)
    chosen, errors = {}, []
    for study, members in sorted(by_study.items()):
        pick = choose_series(members, rule)
        if pick is None:
            found = sorted({f"{s.plane} {s.weighting} ({len(s.slices)} slices)" for s in members})
            errors.append(FileError(f"study {study}", f"no {rule.plane} {rule.weighting} series "
                                    f"with >= {rule.min_slices} slices; found: {', '.join(found)}",
                                    study, None))
        else:
            chosen[study] = pick
    return chosen, errors


def load_volume(store: DicomStore, series: Series) -> tuple[Volume | None, list[FileError]]:
    """Pixels of every decodable slice, rescaled (slope/intercept) to float32. Undecodable slices
    are reported and left out; spacing between slices comes from the kept slices' positions."""
    arrays, kept, errors = [], [], []
    for h in series.slices:
        try:
            arrays.append(_slice_pixels(store, h))
            kept.append(h)
        except UnusableFile as err:
            errors.append(FileError(h.name, str(err), series.study_uid, series.series_uid))
    if not arrays:
        return None, errors
    pixels = np.stack(arrays)
    spacing = (_slice_spacing(kept), *(kept[0].pixel_spacing or (1.0, 1.0)))
    if kept[0].pixel_spacing is None:
        log.warning("series %s has no PixelSpacing; assuming 1 mm", series.series_uid)
    volume = Volume(series.study_uid, series.series_uid, pixels, spacing,  # type: ignore[arg-type]
                    [h.instance_number for h in kept])
    return volume, errors


def _slice_pixels(store: DicomStore, h: SliceHeader) -> np.ndarray:
    ds = read_dataset(store, h.name, pixels=True)
    if "PixelData" not in ds:
        raise UnusableFile("no pixel data")
    try:
        raw = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - missing codec, truncated data, bad group 0028
        raise UnusableFile(f"pixel data cannot be decoded: {err}") from err
    if raw.shape != (h.rows, h.columns):
        raise UnusableFile(f"pixel array of shape {raw.shape}, expected ({h.rows}, {h.columns})")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return (raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def _slice_spacing(slices: list[SliceHeader]) -> float:
    """Median distance between neighbouring slices along the normal; slice thickness for one."""
    if len(slices) < 2:
        return float(slices[0].slice_thickness or 1.0)
    normal = slice_normal(slices[0].orientation)  # type: ignore[arg-type]
    along = np.array([np.dot(normal, h.position) for h in slices])
    return float(np.median(np.diff(along)))
