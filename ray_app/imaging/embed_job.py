"""The disc-embedding job on Ray Data: DICOM archive + disc locations -> Parquet embeddings keyed
by (study_uid, series_uid, level), plus an errors table. Headers are read by tasks, series are
chosen on the driver, discs are cut by tasks and embedded by actors (one per GPU where the
cluster has GPUs, else CPU actors), which write their own Parquet parts.

Resumable disc by disc, the granularity the actors write at: a located disc (study_uid,
series_uid, level) is done when its embedding row exists or its crop failed with an error recorded
for that disc. A rerun skips studies whose located discs are all done and cuts and embeds only the
missing discs of the others (each task row carries only its study's missing locations). Part files
are named after the discs (or errors) they hold, so a batch Ray runs twice replaces its own file."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from ray_app.imaging.dicom_series import SelectionRule
from ray_app.imaging.dicom_store import (
    DicomStore,
    FileError,
    SliceHeader,
    UnusableFile,
    read_header,
)
from ray_app.imaging.disc_volumes import read_locations
from ray_app.imaging.embeddings import DiscEmbedder, EmbeddingSettings, load_encoder
from ray_app.imaging.studies import series_by_study, study_disc_volumes
from ray_app.pipeline import placement
from ray_app.pipeline import report_tables as tables
from ray_app.pipeline.ray_session import ensure_ray
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
    device: str = field(default="auto", metadata={"doc": "'cuda': one GPU per encoder actor, whatever the cluster holds now (an autoscaler adds GPU nodes); 'cpu'; 'auto': GPUs if the cluster has or can reach some."})
    max_actors: int | None = field(default=None, metadata={"doc": "Encoder actors; default: the GPUs the cluster can reach, or 1 on CPU."})
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
    reported: set[tuple[str, str]] = set()
    for reported_json in batch.get("reported", ()):
        reported |= {tuple(r) for r in json.loads(reported_json)}
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
    # A resumed study meets its earlier problems again (unreadable slices, say): record them once.
    write_errors(out, [e for e in errors if (e.name, e.reason) not in reported])
    shape = (0, *cfg.crop_shape)
    return {"study_uid": np.array([d.study_uid for d in rows], dtype=object),
            "series_uid": np.array([d.series_uid for d in rows], dtype=object),
            "level": np.array([d.level for d in rows], dtype=object),
            "pixels": np.stack([d.pixels for d in rows]) if rows else np.zeros(shape, np.float32)}


def _tuples(data: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def write_errors(out: tables.TableLocation, errors: list[FileError]) -> None:
    """One errors part, named after its errors: a crop task Ray re-runs replaces its own file."""
    if errors:
        now = utc_now()
        rows = [{**asdict(e), "recorded_at": now} for e in errors]
        key = "\n".join(sorted(json.dumps([e.name, e.reason, e.study_uid, e.series_uid]) for e in errors))
        tables.write_table_atomically(tables.rows_table(rows, ERROR_SCHEMA), out.child("errors"),
                                      key=key)


def disc_key(study_uid: str, series_uid: str, level: str) -> str:
    return f"{study_uid}|{series_uid}|{level}"


def batch_key(study_uids, series_uids, levels) -> str:
    """The name of a batch's embeddings part: its discs, in sorted order (the same discs give the
    same file whatever order Ray hands them in)."""
    return "\n".join(sorted(disc_key(*k) for k in zip(study_uids, series_uids, levels)))


class EmbedActor:
    """Ray Data callable class: one encoder per actor; writes each batch's embeddings."""

    def __init__(self, cfg: EmbedJobConfig, torch_threads: int | None):
        import torch

        placement.record_placement("embed-actor")
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
        tables.write_table_atomically(
            embedding_table(rows, self.embedder.weights_id), self.out.child("embeddings"),
            key=batch_key(batch["study_uid"], batch["series_uid"], batch["level"]))
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
    studies: int  # studies with discs to embed in this run (resumed ones included)
    studies_skipped_done: int  # studies whose located discs were all done already
    discs_embedded: int
    seconds: float
    output: str
    discs_skipped_done: int = 0  # located discs already embedded or recorded as crop errors


def run_embed_job(cfg: EmbedJobConfig) -> EmbedSummary:

    started = time.monotonic()
    out = tables.locate(cfg.output, cfg.s3_endpoint)
    # The inputs first: a wrong path fails at once, before weights load, the output is written
    # or Ray starts.
    locations = read_locations(cfg.locations, cfg.s3_endpoint)
    names = DicomStore.from_uri(cfg.dicom, cfg.s3_endpoint).names
    settings = job_settings(cfg)
    check_manifest(out, settings)
    previous = Previous.read(out)
    ensure_ray()
    headers = _scan_headers(cfg, names, out)
    tasks, skipped = _study_tasks(headers, locations, previous, cfg.limit)
    log.info("%d files, %d studies with discs to embed, %d studies (%d discs) already done",
             len(names), len(tasks), skipped.studies, skipped.discs)
    discs = _embed_studies(cfg, tasks) if tasks else 0
    summary = EmbedSummary(len(names), len(tasks), skipped.studies, discs,
                           round(time.monotonic() - started, 2), cfg.output, skipped.discs)
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


@dataclass
class Previous:
    """What earlier runs left in the output, study by study: the discs embedded as
    {study: {(series_uid, level)}}, and the errors recorded as {study: rows of name, reason,
    series_uid}."""

    embedded: dict[str, set[tuple[str, str]]]
    errors: dict[str, pd.DataFrame]

    @classmethod
    def read(cls, out: tables.TableLocation) -> "Previous":
        rows = tables.read_finished(out.child("embeddings"), ["study_uid", "series_uid", "level"])
        embedded: dict[str, set[tuple[str, str]]] = {}
        for study, series, level in zip(rows["study_uid"], rows["series_uid"], rows["level"]):
            embedded.setdefault(study, set()).add((series, level))
        errors = tables.read_finished(out.child("errors"), ["name", "reason", "study_uid", "series_uid"])
        errors = errors[errors["study_uid"].notna()]
        return cls(embedded, {study: group for study, group in errors.groupby("study_uid")})

    def done_discs(self, study: str, group: pd.DataFrame) -> pd.Series:
        """Which of a study's location rows are done: embedded, or their crop failed with an
        error recorded for that disc. A row naming no series ('*' or blank: the rule chose one)
        matches that level in whichever series it was cut from."""
        embedded = self.embedded.get(study, set())
        errors = self.errors.get(study)
        disc_errors = set() if errors is None else {
            (series, str(reason)) for name, series, reason
            in zip(errors["name"], errors["series_uid"], errors["reason"])
            if name == f"study {study}" and str(reason).startswith("disc ")}  # study_disc_volumes
        done = []
        for series, level in zip(group["series_uid"], group["level"]):
            named = str(series).strip() not in ("", "*")  # as series_for_locations reads it
            prefix = f"disc {level}: "
            done.append(
                any(lv == level and (not named or se == series) for se, lv in embedded)
                or any(r.startswith(prefix) and (not named or se == series) for se, r in disc_errors))
        return pd.Series(done, index=group.index, dtype=bool)

    def reported(self, study: str) -> list[list[str]]:
        errors = self.errors.get(study)
        return [] if errors is None else [[n, r] for n, r in zip(errors["name"], errors["reason"])]


@dataclass
class Skipped:
    studies: int = 0  # every located disc done
    discs: int = 0  # located discs done (in those studies and in resumed ones)


def _study_tasks(headers: pd.DataFrame, locations: pd.DataFrame, previous: Previous,
                 limit: int | None) -> tuple[list[dict], Skipped]:
    """One task per study that has locations and discs still to do: its headers, the locations of
    its missing discs only, and the errors already recorded for it (not to record them twice)."""
    parsed = [json.loads(h) for h in headers["header"]]
    by_study: dict[str, list[dict]] = {}
    for h in parsed:
        by_study.setdefault(h["study_uid"], []).append(h)
    tasks, skipped = [], Skipped()
    for study, group in locations.groupby("study_uid"):
        if study not in by_study:
            log.warning("study %s in the locations table has no readable images", study)
            continue
        done = previous.done_discs(study, group)
        skipped.discs += int(done.sum())
        if done.all():
            skipped.studies += 1
            continue
        if done.any():
            log.info("study %s: resuming, %d of %d discs done", study, int(done.sum()), len(group))
        tasks.append({"headers": json.dumps(by_study[study]),
                      "locations": group[~done].to_json(orient="records"),
                      "reported": json.dumps(previous.reported(study))})
    return (tasks[:limit] if limit else tasks), skipped


def _embed_studies(cfg: EmbedJobConfig, tasks: list[dict]) -> int:
    import ray
    import ray.data

    capacity = placement.cluster_capacity()
    # On CPUs one encoder actor by default: the crop tasks need the other cores.
    default = None if placement.wants_gpu(cfg.device, capacity) else 1
    where = placement.plan(cfg.device, capacity, cpus_per_worker=cfg.cpus_per_actor,
                           max_workers=cfg.max_actors or default)
    threads, resources, ceiling = where.cpu_threads, where.remote_args(), where.max_workers
    discs = ray.data.from_items(tasks).map_batches(
        crop_batch, fn_kwargs={"cfg": cfg}, batch_size=cfg.studies_per_task, batch_format="pandas",
        num_cpus=0.5,
    ).map_batches(
        EmbedActor, fn_constructor_kwargs={"cfg": cfg, "torch_threads": threads},
        # GPU encoders all at once: Ray Data grows a pool only within what the cluster holds now.
        compute=ray.data.ActorPoolStrategy(min_size=ceiling if where.use_gpu else 1,
                                           max_size=ceiling),
        batch_size=cfg.batch_volumes, batch_format="numpy", **resources,
        max_restarts=3, max_task_retries=-1,  # a lost node or crashed encoder: bounded retries
    )
    return int(sum(int(b["discs"].sum()) for b in discs.iter_batches(batch_size=None)))
