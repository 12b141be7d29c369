"""Disc locations in, intervertebral-disc (IVD) volumes out.

Locations table (CSV or Parquet, local or s3://), one row per disc:

    study_uid    StudyInstanceUID of the study
    series_uid   SeriesInstanceUID of the series the coordinates refer to
    level        disc level, e.g. L4-L5 (RSNA's 'l4_l5' and 'L4/L5' are accepted)
    slice_index  0-based index of the disc's central slice in spatial order (ImagePositionPatient
                 projected on the slice normal; that is the order of Volume.pixels)
    x, y         disc centre in that slice, in pixels (x: column, y: row; fractions allowed)

The RSNA 2024 lumbar-spine coordinates CSV (study_id, series_id, instance_number, condition,
level, x, y) is accepted too: its ids must be the DICOM UIDs (as in the RSNA release), its
instance numbers are turned into slice indices once the series is read, and where several
conditions mark a level the 'Spinal Canal Stenosis' point is used, else their mean.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.ndimage import map_coordinates

from ray_app.imaging.dicom_series import Volume
from ray_app.pipeline import report_tables as tables

log = logging.getLogger(__name__)

CROP_SHAPE = (9, 112, 224)  # slices, height, width (the paper's IVD volume)
LOCATION_COLUMNS = ["study_uid", "series_uid", "level", "slice_index", "instance_number", "x", "y"]
RSNA_COLUMNS = {"study_id", "series_id", "instance_number", "condition", "level", "x", "y"}
RSNA_CENTRAL = "spinal canal stenosis"


class LocationsError(ValueError):
    """A locations table this module cannot use."""


@dataclass
class DiscVolume:
    study_uid: str
    series_uid: str
    level: str
    pixels: np.ndarray  # float32 (slices, height, width)


def normalise_level(level: object) -> str:
    """'L4-L5' from 'l4_l5', 'L4/L5', 'L4-5' or ' l4 l5 '."""
    text = re.sub(r"[\s_/]+", "-", str(level).strip().upper())
    match = re.fullmatch(r"([CTLS])(\d+)-(?:([CTLS])?(\d+))", text)
    if not match:
        return text
    first, n1, second, n2 = match.groups()
    return f"{first}{n1}-{second or first}{n2}"


def read_locations(uri: str, s3_endpoint: str | None = None) -> pd.DataFrame:
    """A locations table (either layout) as LOCATION_COLUMNS; ids as strings, levels normalised."""
    loc = tables.locate(uri, s3_endpoint)
    fmt = tables.table_format(uri)
    with loc.fs.open_input_stream(tables.input_files(loc)[0]) as f:
        raw = pd.read_csv(f, dtype=str) if fmt == "csv" else pd.read_parquet(f)
    return normalise_locations(raw, uri)


def normalise_locations(raw: pd.DataFrame, source: str = "locations table") -> pd.DataFrame:
    columns = set(raw.columns)
    if {"study_uid", "series_uid", "level", "x", "y"} <= columns and (
            "slice_index" in columns or "instance_number" in columns):
        frame = raw.copy()
    elif RSNA_COLUMNS <= columns:
        frame = _from_rsna(raw)
    else:
        raise LocationsError(
            f"{source} has columns {sorted(columns)}; expected study_uid, series_uid, level, "
            "slice_index, x, y (pixels) or the RSNA layout study_id, series_id, instance_number, "
            "condition, level, x, y")
    for name in ("slice_index", "instance_number"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce") if name in frame else np.nan
    frame["x"], frame["y"] = pd.to_numeric(frame["x"]), pd.to_numeric(frame["y"])
    frame["study_uid"] = frame["study_uid"].astype(str).str.strip()
    frame["series_uid"] = frame["series_uid"].astype(str).str.strip()
    frame["level"] = frame["level"].map(normalise_level)
    return frame[LOCATION_COLUMNS].reset_index(drop=True)


def _from_rsna(raw: pd.DataFrame) -> pd.DataFrame:
    frame = raw.rename(columns={"study_id": "study_uid", "series_id": "series_uid"}).copy()
    frame["level"] = frame["level"].map(normalise_level)
    frame["x"], frame["y"] = pd.to_numeric(frame["x"]), pd.to_numeric(frame["y"])
    frame["instance_number"] = pd.to_numeric(frame["instance_number"])
    central = frame["condition"].str.strip().str.lower() == RSNA_CENTRAL
    keys = ["study_uid", "series_uid", "level"]
    has_central = frame[central].set_index(keys).index
    rest = frame[~frame.set_index(keys).index.isin(has_central)]
    averaged = rest.groupby(keys, as_index=False)[["instance_number", "x", "y"]].mean()
    averaged["instance_number"] = averaged["instance_number"].round()
    return pd.concat([frame[central][[*keys, "instance_number", "x", "y"]], averaged],
                     ignore_index=True)


def slice_index_for(row: pd.Series, volume: Volume) -> int:
    """The row's slice index in `volume`, from slice_index or from its instance number."""
    if pd.notna(row["slice_index"]):
        return int(row["slice_index"])
    if pd.notna(row["instance_number"]):
        return volume.slice_index_of(int(row["instance_number"]))
    raise LocationsError(f"disc {row['level']} of series {row['series_uid']} has neither "
                         "slice_index nor instance_number")


def crop_disc(volume: np.ndarray, slice_index: int, x: float, y: float,
              shape: tuple[int, int, int] = CROP_SHAPE,
              scale: tuple[float, float] = (1.0, 1.0), fill: float = 0.0) -> np.ndarray:
    """A (slices, height, width) block centred on (slice_index, y, x): output index
    (shape // 2) is the centre. `scale` = output pixel size / input pixel size per in-plane axis
    (1: a plain crop; else bilinear resampling). Anything outside the volume is `fill`."""
    n, height, width = shape
    rows = y + (np.arange(height) - height // 2) * scale[0]
    cols = x + (np.arange(width) - width // 2) * scale[1]
    grid_r, grid_c = np.meshgrid(rows, cols, indexing="ij")
    out = np.full(shape, fill, np.float32)
    for k, s in enumerate(range(slice_index - n // 2, slice_index - n // 2 + n)):
        if 0 <= s < volume.shape[0]:
            out[k] = map_coordinates(volume[s], [grid_r, grid_c], order=1, mode="constant",
                                     cval=fill, prefilter=False)
    return out


def disc_volumes(volume: Volume, locations: pd.DataFrame,
                 shape: tuple[int, int, int] = CROP_SHAPE,
                 target_spacing_mm: float | None = None) -> tuple[list[DiscVolume], list[str]]:
    """One DiscVolume per location row of this series (optionally resampled so that every
    output pixel is `target_spacing_mm` wide), and the reasons for rows that could not be cut."""
    scale = (1.0, 1.0)
    if target_spacing_mm:
        scale = (target_spacing_mm / volume.spacing[1], target_spacing_mm / volume.spacing[2])
    discs, problems = [], []
    for _, row in locations.iterrows():
        try:
            index = slice_index_for(row, volume)
            if not 0 <= index < volume.pixels.shape[0]:
                raise LocationsError(f"slice {index} outside the series' {volume.pixels.shape[0]} slices")
        except (KeyError, LocationsError) as err:
            problems.append(f"{row['level']}: {err}")
            continue
        pixels = crop_disc(volume.pixels, index, float(row["x"]), float(row["y"]), shape, scale)
        discs.append(DiscVolume(volume.study_uid, volume.series_uid, row["level"], pixels))
    return discs, problems
