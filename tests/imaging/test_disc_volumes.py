"""Crop geometry (centre, borders, resampling) and the two locations-table layouts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ray_app.imaging.dicom_series import Volume
from ray_app.imaging.disc_volumes import (
    LocationsError,
    crop_disc,
    disc_volumes,
    normalise_level,
    normalise_locations,
)


def numbered_volume(slices=5, rows=40, cols=60) -> np.ndarray:
    """Each voxel's value encodes its (slice, row, column)."""
    s, r, c = np.mgrid[0:slices, 0:rows, 0:cols]
    return (s * 10000 + r * 100 + c).astype(np.float32)


def test_crop_centre_and_interior_are_an_exact_copy():
    vol = numbered_volume()
    crop = crop_disc(vol, slice_index=2, x=30, y=20, shape=(3, 8, 10))
    assert crop.shape == (3, 8, 10)
    assert crop[1, 4, 5] == vol[2, 20, 30]  # shape // 2 is the centre
    np.testing.assert_array_equal(crop, vol[1:4, 16:24, 25:35])


def test_crop_at_the_borders_is_padded_in_every_axis():
    vol = numbered_volume()
    crop = crop_disc(vol, slice_index=0, x=1, y=38, shape=(3, 8, 10), fill=-1.0)
    assert (crop[0] == -1).all()                      # slice -1 does not exist
    np.testing.assert_array_equal(crop[1:, :6, 4:], vol[0:2, 34:40, 0:6])
    assert (crop[1:, 6:, :] == -1).all()              # rows 40, 41 are past the bottom
    assert (crop[1:, :, :4] == -1).all()              # columns -4 .. -1 are before the left edge
    far = crop_disc(vol, slice_index=2, x=500, y=500, shape=(3, 8, 10))
    assert (far == 0).all()


def test_resampling_scales_distances_about_the_centre():
    vol = numbered_volume(rows=80, cols=80)
    crop = crop_disc(vol, 2, x=40, y=40, shape=(1, 9, 9), scale=(0.5, 2.0))
    # Output pixel k of a row sits (k - 4) * 2 columns from the centre; of a column, (k - 4) / 2 rows.
    np.testing.assert_allclose(crop[0, 4, :], vol[2, 40, 32:49:2])
    np.testing.assert_allclose(crop[0, :, 4], 20000 + (40 + (np.arange(9) - 4) * 0.5) * 100 + 40)


def test_disc_volumes_resample_to_a_target_spacing_and_report_bad_rows():
    volume = Volume("st", "se", numbered_volume(rows=80, cols=80), (4.0, 0.5, 0.5),
                    [7, 6, 5, 4, 3])
    locations = normalise_locations(pd.DataFrame({
        "study_uid": ["st"] * 3, "series_uid": ["se"] * 3, "level": ["L4-L5", "L5-S1", "L3-L4"],
        "instance_number": [5, 99, None], "slice_index": [None, None, 9], "x": [40, 40, 40],
        "y": [40, 40, 40]}))
    discs, problems = disc_volumes(volume, locations, shape=(1, 5, 5), target_spacing_mm=1.0)
    assert [d.level for d in discs] == ["L4-L5"]
    # Slice index 2 holds instance 5; 1 mm output pixels over 0.5 mm input: every other column.
    np.testing.assert_allclose(discs[0].pixels[0, 2, :], volume.pixels[2, 40, 36:45:2])
    assert len(problems) == 2
    assert "no instance number 99" in problems[0] and "slice 9 outside" in problems[1]


def test_levels_are_normalised():
    assert [normalise_level(v) for v in ["l4_l5", "L4/L5", "L4-5", " l5 s1 ", "L5-S1"]] == [
        "L4-L5", "L4-L5", "L4-L5", "L5-S1", "L5-S1"]


def test_rsna_coordinates_layout_is_accepted():
    raw = pd.DataFrame({
        "study_id": ["100"] * 4, "series_id": ["200"] * 4, "instance_number": [8, 9, 10, 11],
        "condition": ["Spinal Canal Stenosis", "Left Neural Foraminal Narrowing",
                      "Left Neural Foraminal Narrowing", "Right Subarticular Stenosis"],
        "level": ["L4/L5", "L4/L5", "L5/S1", "L5/S1"], "x": [100.0, 90.0, 110.0, 130.0],
        "y": [200.0, 210.0, 240.0, 250.0]})
    locs = normalise_locations(raw).set_index("level")
    assert list(locs.index) == ["L4-L5", "L5-S1"]
    assert locs.loc["L4-L5", ["instance_number", "x", "y"]].tolist() == [8, 100.0, 200.0]  # canal point
    assert locs.loc["L5-S1", ["instance_number", "x", "y"]].tolist() == [10, 120.0, 245.0]  # mean
    assert (locs["study_uid"] == "100").all() and locs["slice_index"].isna().all()


def test_an_unknown_layout_is_refused_with_the_expected_columns():
    with pytest.raises(LocationsError, match="study_uid, series_uid, level"):
        normalise_locations(pd.DataFrame({"study": ["1"], "x": [1], "y": [2]}))
