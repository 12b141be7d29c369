"""Series grouping, slice order from positions, series selection, and volumes from phantoms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ray_app.imaging.dicom_series import (
    SelectionRule,
    choose_per_study,
    choose_series,
    group_series,
    load_volume,
    order_slices,
    plane_of,
    weighting_of,
)
from ray_app.imaging.dicom_store import DicomStore, SliceHeader, scan_headers
from ray_app.imaging.phantoms import SCALE

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def header(name="f", study="1.1", series="1.1.1", position=(0.0, 0.0, 0.0), orientation=SAGITTAL,
           description="SAG T2", te=100.0, tr=3000.0, when="20240101120000", number=1,
           instance=1, rows=256, columns=256, spacing=(1.0, 1.0), frames=1) -> SliceHeader:
    return SliceHeader(name, study, series, instance, position, orientation, spacing, 4.0, rows,
                       columns, frames, "MR", description, "SE", te, tr, when, number)


def series_of(n: int, **kwargs) -> list[SliceHeader]:
    return [header(name=f"{kwargs.get('series', 's')}-{i}", position=(-4.0 * i, 0.0, 0.0),
                   instance=i + 1, **kwargs) for i in range(n)]


def test_slices_follow_positions_on_the_normal_not_names_or_instance_numbers():
    rng = np.random.default_rng(0)
    offsets = rng.permutation(10)
    # Oblique sagittal: the normal is tilted, so sorting by one coordinate alone would be wrong.
    angle = np.deg2rad(20)
    row = (0.0, np.cos(angle), np.sin(angle))
    col = (0.0, 0.0, -1.0)
    orientation = (*row, *col)
    normal = np.cross(row, col)
    slices = [header(name=f"z{k}", instance=int(10 - k), orientation=orientation,
                     position=tuple(np.array([3.0, -50.0, 20.0]) + 3.5 * k * normal))
              for k in offsets]
    ordered = order_slices(slices)
    assert [h.name for h in ordered] == [f"z{k}" for k in range(10)]


def test_planes_and_weightings():
    assert (plane_of(SAGITTAL), plane_of(AXIAL), plane_of(CORONAL)) == ("sagittal", "axial", "coronal")
    assert plane_of(None) is None
    assert weighting_of(header(description="SAG T2 TSE")) == "T2"
    assert weighting_of(header(description="t1_tse_sag", te=100, tr=3000)) == "T1"  # words win
    assert weighting_of(header(description="SAG STIR")) == "STIR"
    assert weighting_of(header(description="T2* GRE")) == "T2*"
    assert weighting_of(header(description="sag 3", te=110, tr=4000)) == "T2"
    assert weighting_of(header(description="sag 3", te=12, tr=600)) == "T1"
    assert weighting_of(header(description="", te=None, tr=None)) == "unknown"


def test_sagittal_t2_is_chosen_among_mixed_series():
    mixed = (series_of(12, series="t1", description="SAG T1", te=10, tr=500)
             + series_of(12, series="ax", orientation=AXIAL, description="AX T2")
             + series_of(3, series="loc", description="SAG T2 localizer")  # too few slices
             + series_of(12, series="t2", description="SAG T2 TSE"))
    series, errors = group_series(mixed)
    assert errors == [] and len(series) == 4
    assert choose_series(series).series_uid == "t2"
    assert choose_series(series, SelectionRule(weighting="T1")).series_uid == "t1"
    assert choose_series(series, SelectionRule(plane="coronal")) is None


def test_latest_whole_spine_series_wins_over_later_lumbar_and_earlier_whole_spine():
    lumbar = dict(rows=320, spacing=(1.0, 1.0))  # 320 mm head to foot
    whole = dict(rows=512, spacing=(1.0, 1.0))   # 512 mm: whole spine
    headers = (series_of(10, series="whole-early", when="20240101090000", **whole)
               + series_of(10, series="whole-late", when="20240101100000", **whole)
               + series_of(10, series="lumbar-latest", when="20240101110000", **lumbar))
    series, _ = group_series(headers)
    assert choose_series(series).series_uid == "whole-late"
    only_lumbar, _ = group_series(series_of(10, series="a", when="1", **lumbar)
                                  + series_of(10, series="b", when="2", **lumbar))
    assert choose_series(only_lumbar).series_uid == "b"


def test_odd_slices_are_reported_and_studies_without_a_match_too():
    headers = series_of(8, series="t2") + [
        header(name="tilted", series="t2", orientation=AXIAL, position=(0.0, 0.0, 9.0)),
        header(name="nowhere", series="t2", position=None),
        header(name="movie", series="t2", frames=30),
    ]
    series, errors = group_series(headers)
    assert len(series[0].slices) == 8
    assert {e.name: e.reason.split()[0] for e in errors} == {
        "tilted": "orientation", "nowhere": "no", "movie": "multi-frame"}
    chosen, missing = choose_per_study(group_series(series_of(8, study="2.2", series="x",
                                                              description="AX T1", orientation=AXIAL))[0])
    assert chosen == {} and missing[0].study_uid == "2.2" and "no sagittal T2" in missing[0].reason


def test_phantom_series_choice_rescaling_and_spacing(phantoms):
    store = DicomStore.from_uri(str(phantoms["dicom"]))
    headers, errors = scan_headers(store)
    assert len(errors) == 2  # the text file and the DICOM without an image
    series, _ = group_series(headers)
    chosen, missing = choose_per_study(series)
    assert missing == []
    truth = pd.read_csv(phantoms["locations"], dtype=str).groupby("study_uid")["series_uid"].first()
    assert {s: c.series_uid for s, c in chosen.items()} == truth.to_dict()
    volume, errors = load_volume(store, next(iter(chosen.values())))
    assert volume.pixels.shape == (7, 96, 96)
    assert volume.spacing == pytest.approx((4.0, 2.5, 2.5))
    # Stored values are (signal * SCALE + 20) * 2: rescaled, the background sits near 0.12 * SCALE.
    assert np.median(volume.pixels) == pytest.approx(0.12 * SCALE, rel=0.2)
    # Instance numbers run against the positions in the phantoms.
    assert volume.instance_numbers == sorted(volume.instance_numbers, reverse=True)
