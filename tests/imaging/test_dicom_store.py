"""Reading files: unusable ones are reported with a reason; pydicom's real MR files load."""

from __future__ import annotations

import warnings
from copy import deepcopy
from dataclasses import replace

import numpy as np
import pydicom
import pytest

from ray_app.imaging.dicom_series import group_series, load_volume
from ray_app.imaging.dicom_store import DicomStore, read_header, scan_headers


def _testdata(name: str) -> str:
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} does not ship with pydicom {pydicom.__version__} (no download here)")
    return str(path)


def test_pydicoms_real_mr_file_loads_with_geometry_and_pixels():
    path = _testdata("MR_small.dcm")
    store = DicomStore.from_items([path])
    header = read_header(store, path)
    assert (header.rows, header.columns) == (64, 64)
    assert header.pixel_spacing == (0.3125, 0.3125)
    series, errors = group_series([header])
    assert errors == [] and series[0].plane == "axial"
    volume, errors = load_volume(store, series[0])
    assert errors == []
    assert volume.pixels.shape == (1, 64, 64) and volume.pixels.dtype == np.float32
    np.testing.assert_array_equal(volume.pixels[0], pydicom.dcmread(path).pixel_array)


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm"])
def test_other_encodings_of_the_real_mr_file_give_the_same_pixels(name):
    reference = pydicom.dcmread(_testdata("MR_small.dcm")).pixel_array
    path = _testdata(name)
    store = DicomStore.from_items([path])
    series, _ = group_series([read_header(store, path)])
    volume, errors = load_volume(store, series[0])
    assert errors == []
    np.testing.assert_array_equal(volume.pixels[0], reference)


def test_truncated_and_undecodable_real_files_are_reported_not_fatal():
    truncated = _testdata("MR_truncated.dcm")
    good = _testdata("MR_small.dcm")
    store = DicomStore.from_items([truncated, good])
    headers, errors = scan_headers(store)
    assert errors == []  # headers are fine; the pixels are not
    series, _ = group_series(headers)
    problems = []
    for s in series:
        _, errs = load_volume(store, s)
        problems += errs
    assert [e.name for e in problems] == [truncated]
    assert "cannot be decoded" in problems[0].reason and "less than expected" in problems[0].reason


def test_jpeg_ls_without_a_decoder_is_reported_with_the_missing_plugin():
    from pydicom.pixels.decoders import JPEGLSLosslessDecoder

    if JPEGLSLosslessDecoder.is_available:
        pytest.skip("a JPEG-LS decoder is installed here, so the file decodes")
    path = _testdata("MR_small_jpeg_ls_lossless.dcm")
    store = DicomStore.from_items([path])
    series, _ = group_series([read_header(store, path)])
    volume, errors = load_volume(store, series[0])
    assert volume is None and len(errors) == 1
    assert "JPEG-LS" in errors[0].reason and "plugins" in errors[0].reason


def test_corrupt_files_each_get_a_reason(tmp_path):
    good = pydicom.dcmread(_testdata("MR_small.dcm"))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "garbage").write_bytes(np.random.default_rng(0).bytes(4096))
    no_uid = deepcopy(good)
    del no_uid.SeriesInstanceUID
    no_uid.save_as(tmp_path / "no_series_uid")
    no_image = deepcopy(good)
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(no_image, keyword)
    no_image.save_as(tmp_path / "no_image")
    good.save_as(tmp_path / "fine")
    headers, errors = scan_headers(DicomStore.from_uri(str(tmp_path)))
    reasons = {e.name.rsplit("/", 1)[-1]: e.reason for e in errors}
    assert [h.name.rsplit("/", 1)[-1] for h in headers] == ["fine"]
    assert set(reasons) == {"notes.txt", "empty", "garbage", "no_series_uid", "no_image"}
    assert reasons["notes.txt"].startswith("not a DICOM file")
    assert reasons["garbage"].startswith("not a DICOM file")
    assert "SeriesInstanceUID" in reasons["no_series_uid"]
    assert reasons["no_image"].startswith("not an image")


def test_bytes_in_memory_read_like_files():
    path = _testdata("MR_small.dcm")
    with open(path, "rb") as f:
        blob = f.read()
    store = DicomStore.from_items([blob, b"junk"])
    headers, errors = scan_headers(store)
    assert [h.name for h in headers] == ["bytes[0]"]
    assert [e.name for e in errors] == ["bytes[1]"]
    assert replace(headers[0], name=path) == read_header(DicomStore.from_items([path]), path)
