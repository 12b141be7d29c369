"""Where DICOM files come from (a local folder tree, an s3:// prefix, paths, or bytes) and their
headers, read without trusting file names. A file that cannot be used is reported, never fatal."""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Sequence

import pyarrow.fs as pafs
import pydicom
from pydicom.errors import InvalidDicomError

from ray_app.pipeline import report_tables as tables

log = logging.getLogger(__name__)

# Tags a file must have to take part in a series (besides pixel data).
REQUIRED_TAGS = ("StudyInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True)
class FileError:
    """A file left out, and why (the errors table of the imaging jobs)."""

    name: str
    reason: str
    study_uid: str | None = None
    series_uid: str | None = None


class UnusableFile(ValueError):
    """A file that is not a usable DICOM image; the message is the reason reported."""


@dataclass(frozen=True)
class SliceHeader:
    """What series grouping, ordering and selection need from one DICOM image's header."""

    name: str
    study_uid: str
    series_uid: str
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    rows: int
    columns: int
    frames: int
    modality: str
    series_description: str
    scanning_sequence: str
    echo_time: float | None
    repetition_time: float | None
    series_datetime: str
    series_number: int | None


class DicomStore:
    """Opens DICOM files by name: files on a pyarrow filesystem (local or S3) or bytes in memory."""

    def __init__(self, fs: pafs.FileSystem | None = None, names: Sequence[str] = (),
                 blobs: dict[str, bytes] | None = None):
        self.fs = fs
        self.blobs = blobs or {}
        self.names = list(names) if names else sorted(self.blobs)

    @classmethod
    def from_uri(cls, uri: str, s3_endpoint: str | None = None) -> "DicomStore":
        """Every file under a folder or s3:// prefix (or one file), whatever its name or extension
        (names starting with '.' or '_' are left out, as for report tables)."""
        loc = tables.locate(uri, s3_endpoint)
        return cls(loc.fs, tables.input_files(loc))

    @classmethod
    def from_items(cls, items: Iterable[str | bytes]) -> "DicomStore":
        """Local paths and/or file contents (bytes get the names 'bytes[i]')."""
        paths, blobs = [], {}
        for i, item in enumerate(items):
            if isinstance(item, (bytes, bytearray, memoryview)):
                blobs[f"bytes[{i}]"] = bytes(item)
            else:
                paths.append(str(item))
        store = cls(pafs.LocalFileSystem() if paths else None, [*paths, *blobs], blobs)
        return store

    def open(self, name: str) -> BinaryIO:
        if name in self.blobs:
            return io.BytesIO(self.blobs[name])
        if isinstance(self.fs, pafs.LocalFileSystem):
            return open(name, "rb")
        # Remote: one GET for the whole object; pydicom's many small reads would each be a request.
        with self.fs.open_input_stream(name) as stream:
            return io.BytesIO(stream.read())


def read_dataset(store: DicomStore, name: str, pixels: bool) -> pydicom.Dataset:
    """The dataset of one file; raises UnusableFile with the reason when it is not DICOM."""
    try:
        with store.open(name) as fp:
            return _parse(fp, pixels)
    except UnusableFile:
        raise
    except OSError as err:
        raise UnusableFile(f"cannot read file: {err}") from err
    except Exception as err:  # noqa: BLE001 - pydicom raises many types on damaged files
        raise UnusableFile(f"damaged DICOM: {type(err).__name__}: {err}") from err


def _parse(fp: BinaryIO, pixels: bool) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(fp, stop_before_pixels=not pixels)
    except InvalidDicomError:
        pass
    # Some archives strip the 128-byte preamble; accept those only if they parse into a dataset
    # with the identifying tags (forced parsing of a random file gives garbage tags instead).
    fp.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=not pixels, force=True)
        except Exception as err:  # noqa: BLE001
            raise UnusableFile(f"not a DICOM file ({type(err).__name__})") from err
    if not all(tag in ds for tag in REQUIRED_TAGS):
        raise UnusableFile("not a DICOM file (no DICM prefix and no study/series UIDs)")
    return ds


def read_header(store: DicomStore, name: str) -> SliceHeader:
    """The header of one image file; raises UnusableFile for non-DICOM and non-image files."""
    ds = read_dataset(store, name, pixels=False)
    missing = [t for t in REQUIRED_TAGS if not str(ds.get(t, "") or "").strip()]
    if missing:
        raise UnusableFile(f"DICOM without {', '.join(missing)}; cannot group it into a series")
    if "Rows" not in ds or "Columns" not in ds:
        sop = ds.get("SOPClassUID")
        kind = getattr(sop, "name", None) or str(sop or "unknown SOP class")
        raise UnusableFile(f"not an image (no Rows/Columns; {kind})")
    return SliceHeader(
        name=name, study_uid=str(ds.StudyInstanceUID).strip(),
        series_uid=str(ds.SeriesInstanceUID).strip(),
        instance_number=_int(ds.get("InstanceNumber")),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
        slice_thickness=_float(ds.get("SliceThickness")),
        rows=int(ds.Rows), columns=int(ds.Columns), frames=_int(ds.get("NumberOfFrames")) or 1,
        modality=str(ds.get("Modality", "") or ""),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        scanning_sequence=_joined(ds.get("ScanningSequence")),
        echo_time=_float(ds.get("EchoTime")), repetition_time=_float(ds.get("RepetitionTime")),
        series_datetime=_series_datetime(ds), series_number=_int(ds.get("SeriesNumber")),
    )


def scan_headers(store: DicomStore, names: Sequence[str] | None = None
                 ) -> tuple[list[SliceHeader], list[FileError]]:
    """Headers of every usable image, and a FileError for each file that is not one."""
    headers, errors = [], []
    for name in store.names if names is None else names:
        try:
            headers.append(read_header(store, name))
        except UnusableFile as err:
            errors.append(FileError(name, str(err)))
    log.debug("%d image headers, %d files left out", len(headers), len(errors))
    return headers, errors


def _series_datetime(ds: pydicom.Dataset) -> str:
    """Sortable 'YYYYMMDDHHMMSS...' of the series (acquisition or content time as fallbacks)."""
    for date_tag, time_tag in (("SeriesDate", "SeriesTime"), ("AcquisitionDate", "AcquisitionTime"),
                               ("ContentDate", "ContentTime"), ("StudyDate", "StudyTime")):
        date = str(ds.get(date_tag, "") or "").strip()
        if date:
            return date + str(ds.get(time_tag, "") or "").strip()
    return ""


def _joined(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _float(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _int(value: object) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == n else None
