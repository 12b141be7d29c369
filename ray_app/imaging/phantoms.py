"""Synthetic DICOM spine studies with known findings: the test data of the imaging pipeline and
the README example. Each study holds a sagittal T2 series (the one to choose), a sagittal T1, an
axial T2 and sometimes an earlier repeat of the sagittal T2; files get random names in shuffled
order, so readers must rely on headers. Written next to them: reports, truth labels in the
labeller's schema, the disc-locations table and a 2D image list for the CNN."""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from ray_app.imaging.phantom_anatomy import (
    LEVELS,
    SpineAnatomy,
    random_anatomy,
    render_slice,
)

log = logging.getLogger(__name__)

SCALE = 1000.0                 # stored float value of full-scale signal
RESCALE = (0.5, -20.0)         # slope, intercept written to every image (readers must apply it)
STENOSIS, CANCER = "spinal_canal_stenosis", "spinal_cancer"


@dataclass(frozen=True)
class PhantomConfig:
    """Size and findings of a phantom dataset."""

    studies: int = field(default=48, metadata={"doc": "Number of studies."})
    size: int = field(default=256, metadata={"doc": "Rows and columns of each image."})
    fov_mm: float = field(default=300.0, metadata={"doc": "Field of view (square), mm."})
    slices: int = field(default=11, metadata={"doc": "Sagittal slices per series."})
    slice_spacing_mm: float = field(default=4.0, metadata={"doc": "Distance between slices."})
    stenosis_rate: float = field(default=0.3, metadata={"doc": "Base chance of stenosis per disc."})
    lesion_rate: float = field(default=0.45, metadata={"doc": "Chance of a vertebral lesion per study."})
    noise: float = field(default=0.05, metadata={"doc": "Noise SD, fraction of full scale."})
    location_jitter_px: float = field(default=1.5, metadata={"doc": "SD of disc-location error."})
    clean: bool = field(default=False, metadata={"doc": "Leave out the non-DICOM, truncated and non-image files."})
    seed: int = field(default=0, metadata={"doc": "Random seed (same seed, same dataset)."})

    @property
    def spacing_mm(self) -> float:
        return self.fov_mm / self.size


@dataclass
class PhantomStudy:
    report_id: str
    study_uid: str
    series_uid: str  # the sagittal T2 that selection must pick
    anatomy: SpineAnatomy
    mid_slice_file: str


def make_phantom_dataset(out: str | Path, cfg: PhantomConfig = PhantomConfig()) -> dict[str, Path]:
    """Write the dataset under `out`; returns the paths of its tables and DICOM folder."""
    out = Path(out)
    rng = np.random.default_rng(cfg.seed)
    studies = [_write_study(out / "dicom", i, cfg, rng) for i in range(cfg.studies)]
    if not cfg.clean:
        _write_junk(out / "dicom" / "misc", studies[0], rng)
    paths = {"dicom": out / "dicom", "reports": out / "reports.csv", "labels": out / "labels.csv",
             "locations": out / "disc_locations.csv", "images": out / "images.csv"}
    pd.DataFrame([_report_row(s) for s in studies]).to_csv(paths["reports"], index=False)
    pd.DataFrame([r for s in studies for r in _label_rows(s)]).to_csv(paths["labels"], index=False)
    locations = [r for s in studies for r in _location_rows(s, cfg, rng)]
    pd.DataFrame(locations).to_csv(paths["locations"], index=False)
    # Relative to the list's own folder, as image lists are read, whatever `out` was.
    pd.DataFrame([{"image": os.path.relpath(s.mid_slice_file, out), "study_uid": s.study_uid,
                   "label": int(s.anatomy.lesion_body is not None)} for s in studies]
                 ).to_csv(paths["images"], index=False)
    log.info("%d phantom studies written to %s", len(studies), out)
    return paths


def report_id_of(index: int) -> str:
    return f"phantom-{index:04d}"


def _write_study(root: Path, index: int, cfg: PhantomConfig, rng: np.random.Generator) -> PhantomStudy:
    anatomy = random_anatomy(rng, cfg.fov_mm, cfg.stenosis_rate, cfg.lesion_rate)
    study_uid = generate_uid(entropy_srcs=[f"study-{cfg.seed}-{index}"])
    folder = root / f"{rng.integers(16 ** 8):08x}"
    base = {"study_uid": study_uid, "report_id": report_id_of(index), "index": index}
    target = _uid(cfg, index, "sag-t2")
    files = _write_sagittal(folder, anatomy, cfg, rng, {**base, "series_uid": target,
                            "description": "SAG T2 TSE", "contrast": "T2", "number": 3,
                            "time": "101500", "te": 100.0, "tr": 3500.0})
    _write_sagittal(folder, anatomy, cfg, rng, {**base, "series_uid": _uid(cfg, index, "sag-t1"),
                    "description": "SAG T1 TSE", "contrast": "T1", "number": 2, "time": "100500",
                    "te": 10.0, "tr": 550.0})
    if index % 3 == 0:  # an earlier, abandoned sagittal T2: the later one must win
        _write_sagittal(folder, anatomy, cfg, rng, {**base, "series_uid": _uid(cfg, index, "sag-t2-early"),
                        "description": "SAG T2 TSE", "contrast": "T2", "number": 1,
                        "time": "095500", "te": 100.0, "tr": 3500.0})
    _write_axial(folder, cfg, rng, {**base, "series_uid": _uid(cfg, index, "ax-t2"),
                 "description": "AX T2", "number": 4, "time": "102500", "te": 100.0, "tr": 4000.0})
    return PhantomStudy(base["report_id"], study_uid, target, anatomy, files[cfg.slices // 2])


def _uid(cfg: PhantomConfig, index: int, what: str) -> str:
    return generate_uid(entropy_srcs=[f"{what}-{cfg.seed}-{index}"])


def _write_sagittal(folder: Path, anatomy: SpineAnatomy, cfg: PhantomConfig,
                    rng: np.random.Generator, series: dict) -> list[str]:
    """Slices from the patient's left (+x) to right; returns file names in that order. Instance
    numbers run the other way, so slice order must come from positions."""
    files = []
    for k in range(cfg.slices):
        lateral = ((cfg.slices - 1) / 2 - k) * cfg.slice_spacing_mm
        signal = render_slice(anatomy, lateral, (cfg.size, cfg.size), cfg.spacing_mm,
                              series["contrast"], rng, cfg.noise)
        geometry = {"orientation": [0, 1, 0, 0, 0, -1], "position": [lateral, 0.0, 0.0],
                    "instance": cfg.slices - k}
        files.append(_write_image(folder, signal, cfg, rng, series, geometry))
    return files


def _write_axial(folder: Path, cfg: PhantomConfig, rng: np.random.Generator, series: dict) -> None:
    for k in range(5):
        signal = rng.normal(0.3, cfg.noise, (cfg.size, cfg.size)).astype(np.float32)
        geometry = {"orientation": [1, 0, 0, 0, 1, 0], "position": [0.0, 0.0, -40.0 * k],
                    "instance": k + 1}
        _write_image(folder, signal, cfg, rng, series, geometry)


def _write_image(folder: Path, signal: np.ndarray, cfg: PhantomConfig, rng: np.random.Generator,
                 series: dict, geometry: dict) -> str:
    ds = _image_dataset(signal, cfg, series, geometry)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{rng.integers(16 ** 12):012x}"  # no extension, no order in the name
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def _image_dataset(signal: np.ndarray, cfg: PhantomConfig, series: dict, geometry: dict) -> pydicom.Dataset:
    slope, intercept = RESCALE
    stored = np.clip(np.round((signal * SCALE - intercept) / slope), 0, 65535).astype(np.uint16)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality, ds.PatientID = "MR", series["report_id"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = series["study_uid"], series["series_uid"]
    ds.StudyDate = ds.SeriesDate = "20240301"
    ds.SeriesTime, ds.SeriesNumber = series["time"], series["number"]
    ds.SeriesDescription, ds.ScanningSequence = series["description"], "SE"
    ds.EchoTime, ds.RepetitionTime = series["te"], series["tr"]
    ds.InstanceNumber = geometry["instance"]
    ds.ImageOrientationPatient = geometry["orientation"]
    ds.ImagePositionPatient = geometry["position"]
    ds.PixelSpacing = [cfg.spacing_mm, cfg.spacing_mm]
    ds.SliceThickness = cfg.slice_spacing_mm
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.set_pixel_data(stored, "MONOCHROME2", 16)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _write_junk(folder: Path, study: PhantomStudy, rng: np.random.Generator) -> None:
    """Files an archive really holds: a text file, a DICOM without pixels, and a truncated slice
    of the first study's sagittal T2 (one position beyond its last slice), which only fails
    when its pixels are decoded."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.txt").write_text("exported by the PACS\n")
    ds = pydicom.dcmread(study.mid_slice_file)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImagePositionPatient = [-1000.0, 0.0, 0.0]
    ds.InstanceNumber = 0
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    (folder / f"{rng.integers(16 ** 12):012x}").write_bytes(buffer.getvalue()[:-2000])
    del ds.PixelData
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(ds, keyword)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(folder / f"{rng.integers(16 ** 12):012x}", enforce_file_format=True)


def _report_row(s: PhantomStudy) -> dict:
    findings = []
    for level in LEVELS:
        severity = s.anatomy.stenosis.get(level, 0.0)
        if severity >= 0.5:
            grade = "Severe" if severity >= 0.8 else "Moderate"
            findings.append(f"{grade} central canal stenosis at {level} from a disc bulge.")
    if s.anatomy.lesion_body:
        findings.append(f"Focal T2 hypointense lesion in the {s.anatomy.lesion_body} vertebral "
                        "body, suspicious for metastasis.")
    text = "FINDINGS: " + (" ".join(findings) or "Normal alignment and marrow signal. No stenosis.")
    return {"report_id": s.report_id, "study_uid": s.study_uid, "text": text}


def _label_rows(s: PhantomStudy) -> list[dict]:
    rid = s.report_id
    rows = [{"report_id": rid, "condition": STENOSIS, "level": level,
             "label": int(s.anatomy.stenosis.get(level, 0.0) >= 0.5)} for level in LEVELS]
    rows.append({"report_id": rid, "condition": CANCER, "level": "",
                 "label": int(s.anatomy.lesion_body is not None)})
    return rows


def _location_rows(s: PhantomStudy, cfg: PhantomConfig, rng: np.random.Generator) -> list[dict]:
    """Disc centres in the chosen series' mid slice, with a detector's small error. Slice 0 is
    the first in position order, i.e. the patient's left-most."""
    rows = []
    for level, (z_mm, y_mm) in s.anatomy.disc_centres().items():
        y_px = z_mm / cfg.spacing_mm + rng.normal(0, cfg.location_jitter_px)
        x_px = (y_mm + s.anatomy.body_depth_mm / 2) / cfg.spacing_mm + rng.normal(0, cfg.location_jitter_px)
        rows.append({"study_uid": s.study_uid, "series_uid": s.series_uid, "level": level,
                     "slice_index": cfg.slices // 2, "x": round(float(x_px), 2),
                     "y": round(float(y_px), 2)})
    return rows
