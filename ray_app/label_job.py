"""The labelling job on Ray Data: read reports, label them in engine actors, write Parquet.

Resumable: each batch's labels and errors are written as whole Parquet files by the actor that
made them, and a rerun skips every (report, condition) already written, so a killed job loses
no finished row and duplicates none. Bad rows go to an errors table and never stop the job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd
import pyarrow as pa

from ray_app import report_tables as tables
from ray_app.calibration import Calibration, CalibrationError
from ray_app.conditions import Condition, load_conditions
from ray_app.engines import EngineConfig, make_engine
from ray_app.engines.base import model_identity
from ray_app.engines.dry_run import DryRunEngine, dry_run_identity
from ray_app.labeller import Labeller, ReportTask
from ray_app.prompts import DEFAULT_TEMPLATE, PromptTemplate, load_prompt
from ray_app import rule_baseline as rules
from ray_app.provenance import code_version, utc_now

log = logging.getLogger(__name__)


@dataclass
class LabelJobConfig:
    """Everything one labelling run needs; every field is a CLI flag of jobs/label_reports.py."""

    input: str = field(metadata={"doc": "CSV, Parquet or JSONL file/folder; local or s3://."})
    output: str = field(metadata={"doc": "Output folder (labels/, errors/, manifest.json)."})
    conditions: list[str] = field(metadata={"doc": "Built-in condition names or YAML paths."})
    method: str = field(default="direct", metadata={
        "doc": "'direct' or 'summary' (LLM), or 'rules' for the rule-based baseline (no model)."})
    id_column: str = field(default="report_id", metadata={"doc": "Column with unique report ids."})
    text_column: str = field(default="text", metadata={"doc": "Column with the report text."})
    input_format: str | None = field(default=None, metadata={"doc": "csv/parquet/json; else by extension."})
    calibration: str | None = field(default=None, metadata={"doc": "Calibration JSON: adds labels."})
    prompt: str | None = field(
        default=None, metadata={"doc": "YAML prompt variant(s); default: the paper's wording."})
    prompt_name: str | None = field(
        default=None, metadata={"doc": "Which variant of a --prompt file with several."})
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"doc": "Model settings."})
    reports_per_batch: int = field(default=64, metadata={"doc": "Reports per actor call (one file)."})
    min_actors: int = field(default=1, metadata={"doc": "Engine actors kept running."})
    max_actors: int | None = field(
        default=None, metadata={"doc": "Autoscaling ceiling; None: GPUs in the cluster, or 1."}
    )
    cpus_per_actor: float = field(default=1.0, metadata={"doc": "CPU actors: CPUs reserved each."})
    s3_endpoint: str | None = field(default=None, metadata={"doc": "S3-compatible endpoint URL."})
    limit: int | None = field(default=None, metadata={"doc": "Only the first N input rows (trials)."})
    progress_every_s: float = field(default=10.0, metadata={"doc": "Seconds between progress logs."})


@dataclass
class JobSummary:
    input_rows: int
    reports_labelled: int
    label_rows: int
    error_rows: int
    skipped_done: int
    seconds: float
    output: str


class ResumeError(RuntimeError):
    """The output folder holds labels made with a different setup."""


def _expected_model_id(engine: EngineConfig) -> str | None:
    """What the engine will record as its model_id, without loading the model; None for an
    engine of your own ('package.module:Class'), whose ids are its own business."""
    if ":" in engine.engine:
        return None
    if engine.engine == DryRunEngine.name:
        return dry_run_identity(engine)
    return model_identity(engine)


def prompt_template(cfg: LabelJobConfig) -> PromptTemplate:
    return load_prompt(cfg.prompt, cfg.prompt_name) if cfg.prompt else DEFAULT_TEMPLATE


def _setup_identity(cfg: LabelJobConfig, conditions: list[Condition]) -> tuple[str, str]:
    """(model id, prompt hash) that the rows will carry, known before any model loads."""
    if cfg.method == rules.METHOD:
        return rules.rules_model_id(), rules.rules_hash(conditions)
    model = _expected_model_id(cfg.engine) or model_identity(cfg.engine)
    return model, prompt_template(cfg).template_hash(cfg.method)


def make_labeller(cfg: LabelJobConfig) -> Labeller | rules.RuleLabeller:
    conditions = load_conditions(cfg.conditions)
    if cfg.method == rules.METHOD:
        return rules.RuleLabeller(conditions)
    calibration = Calibration.load(cfg.calibration) if cfg.calibration else None
    return Labeller(make_engine(cfg.engine), conditions, cfg.method, prompt_template(cfg),
                    calibration=calibration)


def _check_calibration(cfg: LabelJobConfig, conditions: list[Condition],
                       calibration: Calibration | None) -> None:
    """Refuse a calibration made for another model, prompt or definition before any work starts
    (and before the manifest records it); the actors check again against the loaded engine."""
    if calibration is None:
        return
    if cfg.method == rules.METHOD:
        raise CalibrationError("the rule baseline's scores are labels already (1 = mentioned, "
                               "0.5 = hedged, 0 = absent or negated); run it without --calibration")
    model, prompt_hash = _setup_identity(cfg, conditions)
    if _expected_model_id(cfg.engine) is None:
        model = calibration.model  # an engine of your own: the actors check its ids
    for condition in conditions:
        calibration.check_applies(model, prompt_hash, condition.name, condition.definition_hash())


def _manifest(cfg: LabelJobConfig, conditions: list[Condition],
              calibration: Calibration | None) -> dict[str, Any]:
    _check_calibration(cfg, conditions, calibration)
    model, prompt_hash = _setup_identity(cfg, conditions)
    return {
        "model": model,
        "method": cfg.method,
        "prompt_hash": prompt_hash,
        "conditions": {c.name: c.definition_hash() for c in conditions},
        "calibration_id": calibration.calibration_id if calibration else None,
    }


def check_resume(out: tables.TableLocation, manifest: dict[str, Any]) -> None:
    """Refuse to mix labels from another model/prompt/definition into an existing output;
    adding conditions to an existing output is fine."""
    previous = tables.read_manifest(out)
    if previous:
        changed = [k for k in ("model", "method", "prompt_hash", "calibration_id")
                   if previous.get(k) != manifest[k]]
        changed += [f"definition of {name}" for name, h in manifest["conditions"].items()
                    if previous.get("conditions", {}).get(name, h) != h]
        if changed:
            raise ResumeError(
                f"{out.uri} holds labels made with a different {', '.join(changed)}; "
                "write to a new --output folder (or delete the old one) to relabel"
            )
        manifest = {**manifest, "conditions": {**previous["conditions"], **manifest["conditions"]}}
    tables.write_manifest(out, manifest)


def finished_keys(out: tables.TableLocation) -> tuple[set[tuple[str, str]], set[str]]:
    """(report_id, condition) pairs already labelled, and row keys already in the errors table."""
    labels = tables.read_finished(out.child("labels"), ["report_id", "condition"])
    errors = tables.read_finished(out.child("errors"), ["row_key", "condition"])
    row_errors = errors[errors["condition"].isna()]["row_key"]
    return set(zip(labels["report_id"], labels["condition"])), set(row_errors)


class LabelActor:
    """Ray Data callable class: one engine per actor, loaded once."""

    def __init__(self, cfg: LabelJobConfig, done: set, errored: set, duplicates: dict[str, int]):
        self.cfg = cfg
        self.done, self.errored, self.duplicates = done, errored, duplicates
        self.labeller = make_labeller(cfg)
        self.condition_names = list(self.labeller.conditions)
        self.out = tables.locate(cfg.output, cfg.s3_endpoint)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        tasks, errors = self._check_rows(batch)
        rows = self._label(tasks, errors)
        if errors:  # errors first: a crash between the writes only repeats error rows' checks
            table = pa.Table.from_pylist(errors, schema=tables.ERROR_SCHEMA)
            tables.write_table_atomically(table, self.out.child("errors"))
        if rows:
            table = pa.Table.from_pylist(rows, schema=tables.LABEL_SCHEMA)
            tables.write_table_atomically(table, self.out.child("labels"))
        return pd.DataFrame({"reports": [len(tasks)], "rows": [len(rows)], "errors": [len(errors)],
                             "seen": [len(batch)]})

    def _check_rows(self, batch: pd.DataFrame) -> tuple[list[ReportTask], list[dict]]:
        tasks, errors = [], []
        for raw_id, text in zip(batch[self.cfg.id_column], batch[self.cfg.text_column]):
            report_id = tables.clean_id(raw_id)
            key = tables.row_key(report_id, text)
            if key in self.errored:
                continue
            problem = self._row_problem(report_id, text)
            if problem:
                errors.append(_error(key, report_id, None, problem, text))
                continue
            todo = tuple(c for c in self.condition_names if (report_id, c) not in self.done)
            if todo:
                tasks.append(ReportTask(report_id, text, todo))
        return tasks, errors

    def _row_problem(self, report_id: str | None, text: object) -> str | None:
        if report_id is None:
            return f"missing id in column {self.cfg.id_column!r}; give every report a unique id"
        if report_id in self.duplicates:
            return (f"id appears {self.duplicates[report_id]} times in the input, so none of "
                    "those rows was labelled; make ids unique and rerun")
        return tables.text_problem(text)

    def _label(self, tasks: list[ReportTask], errors: list[dict]) -> list[dict]:
        """Label the batch; if the engine fails, retry report by report so one bad report
        cannot take its batch down with it."""
        if not tasks:
            return []
        try:
            return self.labeller.label(tasks)
        except Exception:  # noqa: BLE001 - isolate the failing report below
            log.exception("batch of %d reports failed; retrying one by one", len(tasks))
        rows = []
        for task in tasks:
            try:
                rows.extend(self.labeller.label([task]))
            except Exception as err:  # noqa: BLE001 - recorded in the errors table
                for condition in task.conditions or ():
                    errors.append(_error(tables.row_key(task.report_id, task.text),
                                         task.report_id, condition,
                                         f"engine failed: {type(err).__name__}: {err}", task.text))
        return rows


def _error(key: str, report_id: str | None, condition: str | None, reason: str, text: object):
    preview = text[:80] if isinstance(text, str) else repr(text)[:80]
    return {"row_key": key, "report_id": report_id, "condition": condition, "reason": reason,
            "text_preview": preview, "recorded_at": utc_now()}


def _read_reports(cfg: LabelJobConfig, loc: tables.TableLocation, fmt: str):
    import ray.data

    columns = [cfg.id_column, cfg.text_column]
    if fmt == "csv":
        options = tables.csv_convert_options(columns)
        options.include_columns = columns
        ds = ray.data.read_csv(loc.path, filesystem=loc.fs, convert_options=options,
                               parse_options=tables.csv_parse_options())
    elif fmt == "parquet":
        # Ray's first-generation Parquet reader: the default one (datasource v2, Ray >= 2.5x)
        # starts a ListFiles task and three FooterReader actors for every read, ~0.6 GB and
        # seconds of start-up on a small node, for row-group statistics this job never uses.
        context = ray.data.DataContext.get_current()
        v2 = getattr(context, "use_datasource_v2", None)
        if v2 is not None:
            context.use_datasource_v2 = False
        try:
            ds = ray.data.read_parquet(loc.path, filesystem=loc.fs, columns=columns)
        finally:
            if v2 is not None:
                context.use_datasource_v2 = v2
    else:  # JSON Lines: parsed in Python so that one mistyped row cannot fail the whole file
        ds = ray.data.read_text(tables.input_files(loc), filesystem=loc.fs).map_batches(
            _parse_json_batch, fn_kwargs={"columns": columns, "id_column": cfg.id_column},
            batch_format="pyarrow", batch_size=None)
    return ds.limit(cfg.limit) if cfg.limit else ds


def _parse_json_batch(batch: pa.Table, columns: list[str], id_column: str) -> pd.DataFrame:
    return tables.parse_json_lines(batch.column("text").to_pylist(), columns, id_column)


def _actor_resources(cfg: LabelJobConfig) -> tuple[dict[str, float], int, EngineConfig]:
    """Per-actor resources, the pool's ceiling and the actors' engine settings: one engine per
    GPU (or TP group) where the cluster has GPUs; otherwise CPU actors sized so that read tasks
    keep a CPU to run on."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus and cfg.engine.device != "cpu" and cfg.method != rules.METHOD:
        per_actor = cfg.engine.tensor_parallel_size
        return {"num_gpus": per_actor}, cfg.max_actors or max(1, int(gpus // per_actor)), cfg.engine
    cpus = ray.cluster_resources().get("CPU", 1)
    ceiling = cfg.max_actors or max(1, int((cpus - 1) // cfg.cpus_per_actor))
    engine = cfg.engine
    if engine.cpu_threads is None:
        # Ray sets OMP_NUM_THREADS to the actor's CPU reservation (1), which would halve a CPU
        # engine's speed; the read tasks are cheap, so let each actor use its share of cores.
        per_node = max(int(n.get("Resources", {}).get("CPU", 1)) for n in ray.nodes())
        engine = replace(engine, cpu_threads=max(1, per_node // max(1, min(ceiling, per_node))))
    return {"num_cpus": cfg.cpus_per_actor}, ceiling, engine


def run_label_job(cfg: LabelJobConfig) -> JobSummary:
    started = time.monotonic()
    src, out = tables.locate(cfg.input, cfg.s3_endpoint), tables.locate(cfg.output, cfg.s3_endpoint)
    fmt = tables.table_format(cfg.input, cfg.input_format)
    conditions = load_conditions(cfg.conditions)
    calibration = Calibration.load(cfg.calibration) if cfg.calibration else None
    check_resume(out, _manifest(cfg, conditions, calibration))
    ids = tables.read_column(src, fmt, cfg.id_column)
    tables.require_column(src, fmt, cfg.text_column)  # fail fast on a wrong --text-column
    duplicates = tables.duplicated_ids(ids)
    done, errored = finished_keys(out)
    log.info("%s: %d rows, %d duplicated ids; %d (report, condition) pairs already labelled",
             cfg.input, len(ids), len(duplicates), len(done))
    totals = {"reports": 0, "rows": 0, "errors": 0}
    if _work_left(ids, duplicates, done, conditions, cfg.limit):
        totals = _run_pipeline(cfg, src, fmt, len(ids), done, errored, duplicates)
    else:
        log.info("every report already has every condition in %s: nothing to do", cfg.output)
    summary = JobSummary(
        input_rows=len(ids), reports_labelled=totals["reports"], label_rows=totals["rows"],
        error_rows=totals["errors"], skipped_done=len(done), output=cfg.output,
        seconds=round(time.monotonic() - started, 2),
    )
    log.info("done: %s (code %s)", asdict(summary), code_version())
    return summary


def _work_left(ids, duplicates: dict, done: set, conditions, limit: int | None) -> bool:
    """False only when every row has an id, no id is duplicated, and every (id, condition) is
    written: then the model need not even be loaded. Otherwise the actors sort it out."""
    if limit or duplicates or ids.null_count:
        return True
    names = [c.name for c in conditions]
    return any((tables.clean_id(i), n) not in done for i in ids.to_pylist() for n in names)


def _run_pipeline(cfg: LabelJobConfig, src, fmt: str, n_rows: int, done: set, errored: set,
                  duplicates: dict) -> dict[str, int]:
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    resources, ceiling, engine = _actor_resources(cfg)
    stats = _read_reports(cfg, src, fmt).map_batches(
        LabelActor,
        fn_constructor_kwargs={"cfg": replace(cfg, engine=engine), "done": done,
                               "errored": errored, "duplicates": duplicates},
        compute=ray.data.ActorPoolStrategy(min_size=min(cfg.min_actors, ceiling), max_size=ceiling),
        batch_size=cfg.reports_per_batch, batch_format="pandas", **resources,
    )
    return _follow_progress(stats, n_rows if not cfg.limit else min(cfg.limit, n_rows), cfg)


def _follow_progress(stats, expected_rows: int, cfg: LabelJobConfig) -> dict[str, int]:
    """Drive the pipeline and log progress every few seconds."""
    totals = {"reports": 0, "rows": 0, "errors": 0, "seen": 0}
    started = last = time.monotonic()
    for batch in stats.iter_batches(batch_size=None, batch_format="pandas"):
        for key in totals:
            totals[key] += int(batch[key].sum())
        now = time.monotonic()
        if now - last >= cfg.progress_every_s:
            last = now
            log.info("progress: %d/%d input rows, %d reports labelled, %d errors, %.1f rows/s",
                     totals["seen"], expected_rows, totals["reports"], totals["errors"],
                     totals["seen"] / (now - started))
    return totals
