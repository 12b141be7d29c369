"""The disc-embedding job on Ray Data: DICOM archive + disc locations -> Parquet embeddings keyed
by (study_uid, series_uid, level), plus an errors table. Headers are read by tasks, series are
chosen on the driver, discs are cut by tasks and embedded by actors (one per GPU where the
cluster has GPUs, else CPU actors), which write their own Parquet parts. Resumable: studies
already in the output are skipped."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from ray_app import report_tables as tables
from ray_app.imaging.dicom_series import SelectionRule
from ray_app.imaging.dicom_store import DicomStore, FileError, SliceHeader, read_header, UnusableFile
from ray_app.imaging.disc_volumes import read_locations
from ray_app.imaging.embeddings import DiscEmbedder, EmbeddingSettings, load_encoder
from ray_app.imaging.studies import series_by_study, study_disc_volumes
from ray_app.provenance import code_version, utc_now

log = logging.getLogger(__name__)

EMBEDDING_SCHEMA = pa.schema([
    ("study_uid", pa.string()), ("series_uid", pa.string()), ("level", pa.string()),
    ("embedding", pa.list_(pa.float32())), ("weights_id", pa.string()),
    ("code_version", pa.string()), ("embedded_at", pa.string()),
])
ERROR_SCHEMA = pa.schema([
    ("name", pa.string()), ("study_uid", pa.string()), ("series_uid", pa.string()),
    ("reason", pa.string()), ("recorded_at", pa.string()),
])


@dataclass
class EmbedJobConfig:
    """One embedding run; every field is a flag of jobs/embed_discs.py."""

    dicom: str = field(metadata={"doc": "Folder or s3:// prefix holding the DICOM files (any names)."})
    locations: str = field(metadata={"doc": "Disc locations CSV/Parquet (ray_app.imaging.disc_volumes)."})
    output: str = field(metadata={"doc": "Output folder: embeddings/, errors/, manifest.json."})
    weights: str | None = field(default=None, metadata={"doc": "ResNet18 ImageNet state dict; default: torchvision's cache."})
    allow_random_weights: bool = field(default=False, metadata={"doc": "Run with random weights when none are found (tests only)."})
    crop_shape: tuple[int, int, int] = field(default=(9, 112, 224), metadata={"doc": "Disc volume: slices height width."})
    target_spacing_mm: float | None = field(default=None, metadata={"doc": "Resample crops to this pixel size (mm)."})
    image_size: int = field(default=224, metadata={"doc": "Side each slice is resized to for ResNet18."})
    plane: str = field(default="sagittal", metadata={"doc": "Series plane to choose."})
    weighting: str = field(default="T2", metadata={"doc": "Series weighting to choose (T1, T2, STIR...)."})
    batch_volumes: int = field(default=16, metadata={"doc": "Disc volumes per encoder forward pass."})
    studies_per_task: int = field(default=4, metadata={"doc": "Studies per crop task."})
    max_actors: int | None = field(default=None, metadata={"doc": "Encoder actors; default: GPUs, or 1 on CPU."})
    cpus_per_actor: float = field(default=1.0, metadata={"doc": "CPU actors: CPUs reserved each."})
    s3_endpoint: str | None = field(default=None, metadata={"doc": "S3-compatible endpoint URL."})
    limit: int | None = field(default=None, metadata={"doc": "Only the first N studies (trials)."})


def job_settings(cfg: EmbedJobConfig) -> EmbeddingSettings:
    """The embedding settings, loading the encoder once on the driver to fail fast on missing
    weights and to know their id."""
    _, weights_id = load_encoder(cfg.weights, cfg.allow_random_weights)
    return EmbeddingSettings(weights_id, tuple(cfg.crop_shape), cfg.target_spacing_mm, cfg.image_size)


def check_manifest(out: tables.TableLocation, settings: EmbeddingSettings) -> None:
    """Refuse to mix embeddings made another way into an existing output."""
    previous = tables.read_manifest(out)
    if previous and previous["embedding_settings"] != settings.to_dict():
        raise ValueError(f"{out.uri} holds embeddings made with {previous['embedding_settings']}; "
                         "write to a new --output folder for other settings or weights")
    tables.write_manifest(out, {"embedding_settings": settings.to_dict()})


def _store(cfg: EmbedJobConfig, names: list[str]) -> DicomStore:
    return DicomStore(tables.locate(cfg.dicom, cfg.s3_endpoint).fs, names)


def scan_batch(batch: pd.DataFrame, cfg: EmbedJobConfig) -> pd.DataFrame:
    """Ray task: headers (as JSON) or the reason a file is unusable."""
    store = _store(cfg, list(batch["name"]))
    headers, reasons = [], []
    for name in store.names:
        try:
            headers.append(json.dumps(asdict(read_header(store, name))))
            reasons.append(None)
        except UnusableFile as err:
            headers.append(None)
            reasons.append(str(err))
    return pd.DataFrame({"name": store.names, "header": headers, "reason": reasons})


def crop_batch(batch: pd.DataFrame, cfg: EmbedJobConfig) -> dict[str, np.ndarray]:
    """Ray task: the disc volumes of a few studies; problems go straight to the errors table."""
    out = tables.locate(cfg.output, cfg.s3_endpoint)
    rule = SelectionRule(plane=cfg.plane, weighting=cfg.weighting)
    rows, errors = [], []
    for headers_json, locations_json in zip(batch["headers"], batch["locations"]):
        headers = [SliceHeader(**_tuples(h)) for h in json.loads(headers_json)]
        grouped, bad = series_by_study(headers)
        errors += bad
        for study_series in grouped.values():
            store = _store(cfg, [h.name for s in study_series for h in s.slices])
            discs, more = study_disc_volumes(store, study_series, pd.DataFrame(
                json.loads(locations_json)), rule, tuple(cfg.crop_shape), cfg.target_spacing_mm)
            rows += discs
            errors += more
    write_errors(out, errors)
    shape = (0, *cfg.crop_shape)
    return {"study_uid": np.array([d.study_uid for d in rows], dtype=object),
            "series_uid": np.array([d.series_uid for d in rows], dtype=object),
            "level": np.array([d.level for d in rows], dtype=object),
            "pixels": np.stack([d.pixels for d in rows]) if rows else np.zeros(shape, np.float32)}


def _tuples(data: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def write_errors(out: tables.TableLocation, errors: list[FileError]) -> None:
    if errors:
        now = utc_now()
        rows = [{**asdict(e), "recorded_at": now} for e in errors]
        tables.write_table_atomically(pa.Table.from_pylist(rows, schema=ERROR_SCHEMA), out.child("errors"))


class EmbedActor:
    """Ray Data callable class: one encoder per actor; writes each batch's embeddings."""

    def __init__(self, cfg: EmbedJobConfig, torch_threads: int | None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.embedder = DiscEmbedder(cfg.weights, cfg.allow_random_weights, cfg.image_size,
                                     batch_volumes=cfg.batch_volumes)
        self.out = tables.locate(cfg.output, cfg.s3_endpoint)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not len(batch["level"]):
            return {"discs": np.array([0])}
        vectors = self.embedder.embed(batch["pixels"])
        rows = pd.DataFrame({"study_uid": batch["study_uid"], "series_uid": batch["series_uid"],
                             "level": batch["level"], "embedding": list(vectors)})
        tables.write_table_atomically(embedding_table(rows, self.embedder.weights_id),
                                      self.out.child("embeddings"))
        return {"discs": np.array([len(vectors)])}


def embedding_table(rows: pd.DataFrame, weights_id: str) -> pa.Table:
    """Rows of study_uid, series_uid, level, embedding as a Parquet-ready table with provenance."""
    n, now = len(rows), utc_now()
    return pa.Table.from_pydict({
        "study_uid": list(rows["study_uid"]), "series_uid": list(rows["series_uid"]),
        "level": list(rows["level"]),
        "embedding": [np.asarray(v, np.float32).tolist() for v in rows["embedding"]],
        "weights_id": [weights_id] * n, "code_version": [code_version()] * n,
        "embedded_at": [now] * n}, schema=EMBEDDING_SCHEMA)


@dataclass
class EmbedSummary:
    files: int
    studies: int
    studies_skipped_done: int
    discs_embedded: int
    seconds: float
    output: str


def run_embed_job(cfg: EmbedJobConfig) -> EmbedSummary:
    import ray

    started = time.monotonic()
    out = tables.locate(cfg.output, cfg.s3_endpoint)
    settings = job_settings(cfg)
    check_manifest(out, settings)
    locations = read_locations(cfg.locations, cfg.s3_endpoint)
    done = set(tables.read_finished(out.child("embeddings"), ["study_uid"])["study_uid"])
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    names = DicomStore.from_uri(cfg.dicom, cfg.s3_endpoint).names
    headers = _scan_headers(cfg, names, out)
    tasks = _study_tasks(headers, locations, done, cfg.limit)
    log.info("%d files, %d studies with locations to embed, %d already done",
             len(names), len(tasks), len(done))
    discs = _embed_studies(cfg, tasks) if tasks else 0
    summary = EmbedSummary(len(names), len(tasks), len(done), discs, round(time.monotonic() - started, 2),
                           cfg.output)
    log.info("done: %s (code %s)", asdict(summary), code_version())
    return summary


def _scan_headers(cfg: EmbedJobConfig, names: list[str], out: tables.TableLocation) -> pd.DataFrame:
    import ray.data

    scanned = ray.data.from_items([{"name": n} for n in names]).map_batches(
        scan_batch, fn_kwargs={"cfg": cfg}, batch_size=256, batch_format="pandas").to_pandas()
    reported = set(tables.read_finished(out.child("errors"), ["name"])["name"])
    bad = scanned[scanned["header"].isna() & ~scanned["name"].isin(reported)]
    write_errors(out, [FileError(n, r) for n, r in zip(bad["name"], bad["reason"])])
    return scanned[scanned["header"].notna()]


def _study_tasks(headers: pd.DataFrame, locations: pd.DataFrame, done: set[str],
                 limit: int | None) -> list[dict]:
    """One task per study that has locations and is not done: its headers and its locations."""
    parsed = [json.loads(h) for h in headers["header"]]
    by_study: dict[str, list[dict]] = {}
    for h in parsed:
        by_study.setdefault(h["study_uid"], []).append(h)
    tasks = []
    for study, group in locations.groupby("study_uid"):
        if study in done or study not in by_study:
            if study not in by_study:
                log.warning("study %s in the locations table has no readable images", study)
            continue
        tasks.append({"headers": json.dumps(by_study[study]), "locations": group.to_json(orient="records")})
    return tasks[:limit] if limit else tasks


def _embed_studies(cfg: EmbedJobConfig, tasks: list[dict]) -> int:
    import ray
    import ray.data

    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus:
        resources, ceiling, threads = {"num_gpus": 1}, cfg.max_actors or int(gpus), None
    else:
        cpus = ray.cluster_resources().get("CPU", 1)
        ceiling = cfg.max_actors or 1
        resources = {"num_cpus": cfg.cpus_per_actor}
        # Ray pins an actor to one thread per reserved CPU; let it use its share of the node.
        threads = max(1, int(cpus) // ceiling)
    discs = ray.data.from_items(tasks).map_batches(
        crop_batch, fn_kwargs={"cfg": cfg}, batch_size=cfg.studies_per_task, batch_format="pandas",
        num_cpus=0.5,
    ).map_batches(
        EmbedActor, fn_constructor_kwargs={"cfg": cfg, "torch_threads": threads},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=ceiling),
        batch_size=cfg.batch_volumes, batch_format="numpy", **resources,
    )
    return int(sum(int(b["discs"].sum()) for b in discs.iter_batches(batch_size=None)))
