"""Training data for the MRI classifiers: disc embeddings (from the embedding job) joined with
report labels (from the labelling job, or any table with the same columns), split by study,
fitted, calibrated on validation, scored on test and saved with provenance."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

from ray_app.imaging.classifiers import (
    NSKSVM,
    DiscSVM,
    SplitConfig,
    TrainedClassifier,
    fit_and_calibrate,
    split_studies,
)
from ray_app.imaging.disc_volumes import normalise_level
from ray_app.pipeline import report_tables as tables

log = logging.getLogger(__name__)

KINDS = ("disc", "scan")


@dataclass
class TrainClassifierConfig:
    """One classifier; every field is a flag of jobs/train_mri_classifier.py."""

    embeddings: str = field(metadata={"doc": "Output folder of jobs/embed_discs.py."})
    labels: str = field(metadata={"doc": "Labels (report_id or study_uid, condition, level, label): labelling-job output or CSV/Parquet."})
    output: str = field(metadata={"doc": "Folder to save the classifier in."})
    condition: str = field(metadata={"doc": "Condition whose labels to learn, e.g. spinal_canal_stenosis."})
    kind: str = field(default="disc", metadata={"doc": "'disc': linear SVM per disc (level labels); 'scan': NSK-SVM per scan."})
    reports: str | None = field(default=None, metadata={"doc": "Table of report_id, study_uid linking labels to studies."})
    c: float = field(default=1.0, metadata={"doc": "SVM regularisation C."})
    validation: float = field(default=0.2, metadata={"doc": "Fraction of studies for the EER threshold."})
    test: float = field(default=0.2, metadata={"doc": "Fraction of studies for the reported metrics."})
    seed: int = field(default=0, metadata={"doc": "Split and SVM seed."})
    s3_endpoint: str | None = field(default=None, metadata={"doc": "S3-compatible endpoint URL."})


def read_table(uri: str, s3_endpoint: str | None, string_columns: list[str]) -> pd.DataFrame:
    """A CSV/Parquet file or folder (local or s3://); ids stay strings."""
    loc = tables.locate(uri, s3_endpoint)
    info = loc.fs.get_file_info(loc.path)
    fmt = tables.table_format(uri) if info.is_file else "parquet"
    file_format = fmt
    if fmt == "csv":
        file_format = pads.CsvFileFormat(convert_options=pacsv.ConvertOptions(
            column_types={c: "string" for c in string_columns}))
    files = tables.input_files(loc)
    return pads.dataset(files, format=file_format, filesystem=loc.fs).to_table().to_pandas()


def read_embeddings(uri: str, s3_endpoint: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Embedding rows and the settings they were made with (the folder's manifest)."""
    loc = tables.locate(uri, s3_endpoint)
    try:
        with loc.fs.open_input_stream(loc.child("manifest.json").path) as f:
            settings = json.loads(f.read())["embedding_settings"]
    except FileNotFoundError as err:
        raise FileNotFoundError(f"embeddings folder {uri} does not exist or has no "
                                "manifest.json: pass the output folder of jobs/embed_discs.py"
                                ) from err
    frame = tables.read_finished(loc.child("embeddings"), ["study_uid", "series_uid", "level", "embedding"])
    if frame.empty:
        raise ValueError(f"{uri} holds no embeddings; run jobs/embed_discs.py first")
    return frame.drop_duplicates(["study_uid", "level"], keep="last"), settings


def study_labels(cfg: TrainClassifierConfig) -> pd.DataFrame:
    """study_uid, level ('' for the scan), label of cfg.condition."""
    labels = read_table(cfg.labels, cfg.s3_endpoint, ["report_id", "study_uid", "level", "condition"])
    labels = labels[labels["condition"] == cfg.condition].copy()
    if labels.empty:
        raise ValueError(f"{cfg.labels} has no labels of condition {cfg.condition!r}")
    if "study_uid" not in labels:
        if not cfg.reports:
            raise ValueError(f"{cfg.labels} has no study_uid column: pass --reports with a "
                             "report_id -> study_uid table")
        link = read_table(cfg.reports, cfg.s3_endpoint, ["report_id", "study_uid"])
        labels = labels.merge(link[["report_id", "study_uid"]].drop_duplicates(), on="report_id")
    missing = labels["label"].isna().sum()
    if missing:
        raise ValueError(f"{missing} rows of {cfg.labels} have no label (scores only?): label "
                         "the reports with --calibration, or threshold the scores first")
    levels = labels["level"].fillna("").astype(str).str.strip()
    labels["level"] = [normalise_level(v) if v else "" for v in levels]
    labels["label"] = labels["label"].astype(int)
    return labels[["study_uid", "level", "label"]].drop_duplicates(["study_uid", "level"], keep="last")


def disc_parts(embeddings: pd.DataFrame, labels: pd.DataFrame, split: SplitConfig):
    """{'train'|'validation'|'test': (features, labels)} of discs with a level label."""
    joined = embeddings.merge(labels[labels["level"] != ""], on=["study_uid", "level"])
    _require_rows(len(joined), "disc (study_uid, level)")
    any_positive = joined.groupby("study_uid")["label"].max().to_dict()
    studies = split_studies(any_positive, split)
    return {part: (_stack(joined[joined["study_uid"].isin(ids)]),
                   joined[joined["study_uid"].isin(ids)]["label"].to_numpy())
            for part, ids in studies.items()}


def scan_parts(embeddings: pd.DataFrame, labels: pd.DataFrame, split: SplitConfig):
    """{'train'|'validation'|'test': (bags, labels)}: each bag is a scan's disc embeddings."""
    scan = labels[labels["level"] == ""].set_index("study_uid")["label"]
    bags = {s: _stack(g.sort_values("level")) for s, g in embeddings.groupby("study_uid") if s in scan}
    _require_rows(len(bags), "scan (study_uid)")
    studies = split_studies({s: int(scan[s]) for s in bags}, split)
    return {part: ([bags[s] for s in ids], np.array([scan[s] for s in ids], dtype=int))
            for part, ids in studies.items()}


def _stack(frame: pd.DataFrame) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=np.float32) for v in frame["embedding"]])


def _require_rows(count: int, what: str) -> None:
    if not count:
        raise ValueError(f"no {what} is both embedded and labelled; check that the labels' studies "
                         "(via --reports) and levels match the embeddings")


def train_mri_classifier(cfg: TrainClassifierConfig) -> TrainedClassifier:
    if cfg.kind not in KINDS:
        raise ValueError(f"kind {cfg.kind!r} is not one of {KINDS}")
    embeddings, settings = read_embeddings(cfg.embeddings, cfg.s3_endpoint)
    labels = study_labels(cfg)
    split = SplitConfig(cfg.validation, cfg.test, cfg.seed)
    if cfg.kind == "disc":
        model, parts = DiscSVM(cfg.c, cfg.seed), disc_parts(embeddings, labels, split)
    else:
        model, parts = NSKSVM(cfg.c, cfg.seed), scan_parts(embeddings, labels, split)
    provenance = {"config": asdict(cfg), "split": asdict(split),
                  "counts": {p: int(len(y)) for p, (_, y) in parts.items()}}
    classifier = fit_and_calibrate(model, parts, cfg.condition, provenance, settings)
    classifier.save(cfg.output)
    return classifier
