"""The labelling job on Ray Data: read reports, label them in engine actors, write Parquet.

Resumable at archive size: a rerun skips every (report, condition) already written. The driver
streams the finished keys into hash indexes (resume.py), the read tasks drop finished work
with them, and engine actors receive only their batch. Each batch's labels and errors are
whole Parquet files named after the batch's keys, so a batch that Ray re-runs (a lost node, a
killed actor) replaces its own files: no finished row is lost and none is duplicated.
Bad rows go to the errors table and never stop the job; an engine that stops answering is not
a bad row: its actor is restarted by Ray, and if it keeps dying the job stops with the cause.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from ray_app.engines import EngineConfig
from ray_app.labelling import few_shot
from ray_app.labelling import rule_baseline as rules
from ray_app.labelling.labeller import ReportTask
from ray_app.labelling.run_setup import RunSetup
from ray_app.labelling.score_cache import DEFAULT_ENTRIES
from ray_app.pipeline import placement, resume
from ray_app.pipeline import report_tables as tables
from ray_app.pipeline.placement import Placement
from ray_app.pipeline.progress import Progress
from ray_app.pipeline.ray_session import ensure_ray
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
    encoding: str = field(default="utf-8", metadata={
        "doc": "Text encoding of CSV / JSON Lines input (cp1252, latin-1 for files wholly in "
               "one); a row that does not decode goes to the errors table."})
    calibration: str | None = field(default=None, metadata={"doc": "Calibration JSON: adds labels."})
    prompt: str | None = field(
        default=None, metadata={"doc": "YAML prompt variant(s), or a built-in variant's name: "
                                "'paper', 'report_first' (the report before the condition: one "
                                "shared prefill per report) or 'definitions_first' (every "
                                "condition's definition before the report, computed once per "
                                "run); None: the one the conditions' YAMLs ask for, else paper."})
    prompt_name: str | None = field(
        default=None, metadata={"doc": "Which variant of a --prompt file with several."})
    unit: str | None = field(default=None, metadata={
        "doc": "'report' or 'sentence': ask each condition about the whole report or about "
               "each of its sentences (the report scores as its highest); None: what each "
               "condition's YAML says (unit), else report."})
    few_shot_pool: str | None = field(default=None, metadata={
        "doc": "Reports table (same id/text columns as --input) that conditions with "
               "'few_shot: auto' take their examples from."})
    few_shot_truth: str | None = field(default=None, metadata={
        "doc": "Hand labels (truth CSV) of the --few-shot-pool reports; calibrate on others."})
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"doc": "Model settings."})
    remembered_scores: int = field(default=DEFAULT_ENTRIES, metadata={
        "doc": "Questions whose scores each engine actor keeps, so that a question asked again "
               "(a sentence that recurs across reports, unit: sentence) is not recomputed; "
               "0: only repeats within one batch are asked once."})
    reports_per_batch: int = field(default=64, metadata={"doc": "Reports per actor call (one file)."})
    min_actors: int | None = field(default=None, metadata={
        "doc": "Engine actors started at once; None: every GPU engine up to the ceiling (the "
               "autoscaler starts their nodes together), or 1 on CPUs."})
    max_actors: int | None = field(
        default=None, metadata={"doc": "Autoscaling ceiling; None: the GPUs the cluster can "
                                "reach (autoscaler included), or the CPUs it has less one."})
    cpus_per_actor: float = field(default=1.0, metadata={"doc": "CPUs reserved by each actor."})
    engine_restarts: int = field(default=3, metadata={
        "doc": "Times Ray restarts an engine actor that died (a crashed process, a lost node, an "
               "engine that stopped answering) before the job stops with the cause."})
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
    actor_peak_rss_mb: float = 0.0  # the largest engine actor's peak resident memory
    actor_peak_private_mb: float = 0.0  # ... of its own memory (no shared object store pages)
    questions: int = 0  # asked of the labellers (direct method), and of those
    questions_remembered: int = 0  # answered from a remembered score, without the engine
    driver_peak_rss_mb: float = 0.0  # this process's


class ResumeError(RuntimeError):
    """The output folder holds labels made with a different setup."""


def run_setup(cfg: LabelJobConfig) -> RunSetup:
    """The run's setup from the job's settings: each piece (conditions, prompt, calibration,
    example pool) loaded once, on the driver."""
    return RunSetup.build(method=cfg.method, conditions=cfg.conditions, engine=cfg.engine,
                          prompt=cfg.prompt, prompt_name=cfg.prompt_name, unit=cfg.unit,
                          calibration=cfg.calibration, few_shot_pool=cfg.few_shot_pool,
                          few_shot_truth=cfg.few_shot_truth, id_column=cfg.id_column,
                          text_column=cfg.text_column, s3_endpoint=cfg.s3_endpoint)


# Manifest keys a resumed run must match, as the refusal names them.
_IDENTITY_KEYS = {"model": "model", "method": "method", "prompt_hash": "prompt_hash",
                  "scoring": "engine or dtype", "calibration_id": "calibration_id"}


def check_resume(out: tables.TableLocation, manifest: dict[str, Any]) -> None:
    """Refuse to mix labels from another model/prompt/definition/engine settings into an
    existing output; adding conditions to an existing output is fine."""
    previous = tables.read_manifest(out)
    if previous:
        # A key an older manifest lacks (engine settings before they were recorded) is taken
        # as matching: its folder resumes, and the manifest records the key from now on.
        changed = [name for k, name in _IDENTITY_KEYS.items()
                   if k in previous and previous[k] != manifest[k]]
        changed += [f"definition of {name}" for name, h in manifest["conditions"].items()
                    if previous.get("conditions", {}).get(name, h) != h]
        pools = previous.get(few_shot.MANIFEST_KEY, {})  # also in the definition hash
        changed += [f"few-shot example pool of {name}" for name, entry in
                    manifest.get(few_shot.MANIFEST_KEY, {}).items()
                    if pools.get(name, entry)["pool"] != entry["pool"]]
        if changed:
            raise ResumeError(
                f"{out.uri} holds labels made with a different {', '.join(changed)}; "
                "write to a new --output folder (or delete the old one) to relabel"
            )
        manifest = {**manifest, "conditions": {**previous["conditions"], **manifest["conditions"]}}
        examples = {**previous.get(few_shot.MANIFEST_KEY, {}),
                    **manifest.get(few_shot.MANIFEST_KEY, {})}
        if examples:  # each condition's example reports, for jobs/calibrate.py
            manifest[few_shot.MANIFEST_KEY] = examples
    tables.write_manifest(out, manifest)


class EngineDeadError(RuntimeError):
    """The engine stopped answering (not one report's problem): the actor must be replaced."""


class LabelActor:
    """Ray Data callable class: one engine per actor, loaded once. It holds its batch and
    nothing else: the planning step (`resume.plan_batch`) has already left out finished work."""

    def __init__(self, cfg: LabelJobConfig, setup: RunSetup):
        placement.record_placement("label-actor")
        self.cfg = cfg
        self.labeller = setup.labeller(remembered_scores=cfg.remembered_scores)
        self.out = tables.locate(cfg.output, cfg.s3_endpoint)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        before = self._cache_counts()
        tasks, errors = self._check_rows(batch)
        try:
            rows = self._label(tasks, errors)
        except EngineDeadError as err:
            self._die(err)
        # One name per batch, from its rows' keys: a batch that Ray re-runs after its first
        # run wrote these files replaces them instead of adding duplicates.
        key = _batch_key(batch, self.cfg)
        if errors:  # errors first: a crash between the writes only repeats error rows' checks
            table = tables.rows_table(errors, tables.ERROR_SCHEMA)
            tables.write_table_atomically(table, self.out.child("errors"), key=key)
        if rows:
            table = tables.rows_table(rows, tables.LABEL_SCHEMA)
            tables.write_table_atomically(table, self.out.child("labels"), key=key)
        pairs = sum(len(t.conditions or ()) for t in tasks)
        questions, remembered = (now - then for now, then in zip(self._cache_counts(), before))
        return pd.DataFrame({"reports": [len(tasks)], "rows": [len(rows)], "errors": [len(errors)],
                             "pairs": [pairs], "questions": [questions],
                             "remembered": [remembered],
                             "seen": [len(batch)], "peak_rss_mb": [peak_rss_mb()],
                             "private_mb": [private_mb()]})

    def _cache_counts(self) -> tuple[int, int]:
        cache = getattr(self.labeller, "score_cache", None)  # None: the rule baseline
        return (cache.questions, cache.remembered) if cache is not None else (0, 0)

    def _check_rows(self, batch: pd.DataFrame) -> tuple[list[ReportTask], list[dict]]:
        tasks, errors = [], []
        for raw_id, text, todo, count, read_problem in zip(
                batch[self.cfg.id_column], batch[self.cfg.text_column], batch[resume.TODO_COLUMN],
                batch[resume.DUPLICATES_COLUMN], batch[tables.PROBLEM_COLUMN]):
            report_id = tables.clean_id(raw_id)
            problem = (read_problem if isinstance(read_problem, str) else None) or \
                self._row_problem(report_id, text, int(count))
            if problem:
                errors.append(_error(tables.row_key(report_id, text), report_id, None, problem, text))
            elif todo:
                tasks.append(ReportTask(report_id, text, tuple(todo.split(resume.TODO_SEP))))
        return tasks, errors

    def _row_problem(self, report_id: str | None, text: object, id_count: int) -> str | None:
        if report_id is None:
            return f"missing id in column {self.cfg.id_column!r}; give every report a unique id"
        if id_count > 1:
            return (f"id appears {id_count} times in the input, so none of "
                    "those rows was labelled; make ids unique and rerun")
        return tables.text_problem(text)

    def _label(self, tasks: list[ReportTask], errors: list[dict]) -> list[dict]:
        """Label the batch; if the engine fails, retry report by report so one bad report
        cannot take its batch down with it, unless the engine no longer answers at all."""
        if not tasks:
            return []
        try:
            return self.labeller.label(tasks)
        except Exception as err:  # noqa: BLE001 - isolate the failing report below
            log.warning("batch of %d reports failed (%s: %s); retrying one by one",
                        len(tasks), type(err).__name__, err)
            self._check_engine(err)
        rows = []
        for task in tasks:
            try:
                rows.extend(self.labeller.label([task]))
            except Exception as err:  # noqa: BLE001 - recorded in the errors table
                self._check_engine(err)
                for condition in task.conditions or ():
                    errors.append(_error(tables.row_key(task.report_id, task.text),
                                         task.report_id, condition,
                                         f"engine failed: {type(err).__name__}: {err}", task.text))
        return rows

    def _check_engine(self, failure: Exception) -> None:
        """A report that makes the engine raise is that report's problem; an engine that
        cannot answer a plain question either (a CUDA fault, a dead vLLM engine core, an
        out-of-memory state that does not clear) is dead, and no report is to blame."""
        probe = ReportTask("engine-probe", PROBE_REPORT, (next(iter(self.labeller.conditions)),))
        engine = getattr(self.labeller, "engine", None)  # None: the rule baseline
        try:  # the engine itself, not the scores the labeller remembers
            if engine is None:
                self.labeller.label([probe])
            else:
                engine.score(self.labeller.engine_prompts([probe]))
        except Exception as err:  # noqa: BLE001 - the engine itself is broken
            raise EngineDeadError(f"{type(failure).__name__}: {failure}") from err

    def _die(self, err: EngineDeadError) -> None:
        """Leave the cause where the driver finds it, then end this process: Ray restarts
        the actor (a new process: a fresh engine, a clean CUDA context) and re-runs the batch,
        up to `engine_restarts` times; nothing of this batch was written."""
        log.error("engine dead, restarting the actor: %s", err)
        record_engine_failure(self.out, str(err))
        os._exit(ENGINE_DEAD_EXIT)


PROBE_REPORT = "FINDINGS: Normal study. IMPRESSION: No abnormality."
ENGINE_DEAD_EXIT = 70


def _batch_key(batch: pd.DataFrame, cfg: LabelJobConfig) -> str:
    keys = (f"{tables.row_key(tables.clean_id(i), t)}|{todo}" for i, t, todo in
            zip(batch[cfg.id_column], batch[cfg.text_column], batch[resume.TODO_COLUMN]))
    return "\n".join(sorted(keys))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB). It counts the pages of Ray's shared
    object store that the process has read (input blocks), which `private_mb` leaves out."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def private_mb() -> float:
    """This process's own (anonymous) resident memory now, in MB: what it holds, without the
    shared object store pages it maps. Linux only; 0 elsewhere."""
    try:
        with open("/proc/self/status") as status:
            line = next(l for l in status if l.startswith("RssAnon:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


FAILURES = "engine_failures"


def record_engine_failure(out: tables.TableLocation, cause: str) -> None:
    loc = out.child(FAILURES)
    loc.fs.create_dir(loc.path, recursive=True)
    record = {"cause": cause, "host": socket.gethostname(), "pid": os.getpid(), "at": utc_now()}
    with loc.fs.open_output_stream(f"{loc.path}/{time.time_ns()}-{os.getpid()}.json") as f:
        f.write(json.dumps(record).encode())


def engine_failures_since(out: tables.TableLocation, started_ns: int) -> list[dict]:
    """Engine deaths the actors recorded since the run started, oldest first."""
    loc = out.child(FAILURES)
    try:
        found = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except OSError:
        return []
    records = []
    for info in sorted(found, key=lambda f: f.base_name):
        if info.base_name.endswith(".json") and int(info.base_name.split("-")[0]) >= started_ns:
            with loc.fs.open_input_stream(info.path) as f:
                records.append(json.loads(f.read()))
    return records


def _error(key: str, report_id: str | None, condition: str | None, reason: str, text: object):
    preview = text[:80] if isinstance(text, str) else repr(text)[:80]
    return {"row_key": key, "report_id": report_id, "condition": condition, "reason": reason,
            "text_preview": preview, "recorded_at": utc_now()}


def _read_reports(cfg: LabelJobConfig, loc: tables.TableLocation, fmt: str):
    """Reports as rows of id, text and (CSV, JSON Lines) the reason a row could not be read:
    one undecodable or unparsable row must cost only that row."""
    import ray.data

    columns = [cfg.id_column, cfg.text_column]
    if fmt == "csv":
        options = tables.csv_convert_options(columns, binary=True)  # decoded row by row
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
    else:  # JSON Lines: parsed in Python, line by line, with line numbers for the errors
        ds = ray.data.read_binary_files(tables.input_files(loc), filesystem=loc.fs,
                                        include_paths=True).map_batches(
            _parse_json_batch, fn_kwargs={"columns": columns, "cfg": cfg},
            batch_format="pandas", batch_size=1)
    return ds.limit(cfg.limit) if cfg.limit else ds


def _parse_json_batch(batch: pd.DataFrame, columns: list[str], cfg: LabelJobConfig) -> pd.DataFrame:
    frames = [tables.parse_json_file(data, path, columns, cfg.id_column, cfg.encoding)
              for data, path in zip(batch["bytes"], batch["path"])]
    return pd.concat(frames, ignore_index=True)


def actor_placement(cfg: LabelJobConfig) -> Placement:
    """Engine actors' resources from the configuration (placement.py): one engine per
    `tensor_parallel_size` GPUs when the job runs on GPUs, whatever the cluster holds now; the
    rule baseline never asks for a GPU. CPU actors leave a CPU for the read tasks."""
    device = "cpu" if cfg.method == rules.METHOD else cfg.engine.device
    return placement.place(device, gpus_per_worker=cfg.engine.tensor_parallel_size,
                           cpus_per_worker=cfg.cpus_per_actor, max_workers=cfg.max_actors,
                           spare_cpus=1)


class EngineFailedError(RuntimeError):
    """The engine actors kept dying: the job stops; every row written so far is kept."""


def run_label_job(cfg: LabelJobConfig) -> JobSummary:
    started, started_ns = time.monotonic(), time.time_ns()
    src, out = tables.locate(cfg.input, cfg.s3_endpoint), tables.locate(cfg.output, cfg.s3_endpoint)
    fmt = tables.table_format(cfg.input, cfg.input_format)
    setup = run_setup(cfg)
    for column in (cfg.id_column, cfg.text_column):  # fail fast on a bad input or column,
        tables.require_column(src, fmt, column, cfg.encoding)  # before the output is written
    setup.check_calibration()
    mismatch = setup.adapter_mismatch()
    if mismatch:
        log.warning("adapter %s: %s; its scores may not be the ones it was measured with",
                    setup.engine.adapter, mismatch)
    check_resume(out, setup.identity())
    state = resume.finished_state(out)
    scan = resume.scan_ids(lambda: tables.iter_column(src, fmt, cfg.id_column, cfg.encoding),
                           setup.condition_names, state.done)
    state.duplicates = scan.duplicates
    log.info("%s: %d rows, %d duplicated ids; %d (report, condition) pairs already labelled, "
             "%d to do", cfg.input, scan.rows, len(scan.duplicates), state.done_pairs,
             scan.pairs_to_do)
    totals = {"reports": 0, "rows": 0, "errors": 0}
    if cfg.limit or scan.duplicates or scan.missing_ids or scan.pairs_to_do:
        try:
            to_do = scan.pairs_to_do if not cfg.limit else min(
                scan.pairs_to_do, cfg.limit * len(setup.conditions))
            totals = _run_pipeline(cfg, setup, src, fmt, to_do, state)
        except Exception as err:
            failures = engine_failures_since(out, started_ns)
            if not failures:
                raise
            raise EngineFailedError(
                f"the engine died {len(failures)} time(s) and Ray gave up after "
                f"{cfg.engine_restarts} restart(s) of an actor; last cause: "
                f"{failures[-1]['cause']} (on {failures[-1]['host']}). Every row written to "
                f"{cfg.output} is kept: fix the cause and rerun the same command to resume"
            ) from err
    else:
        log.info("every report already has every condition in %s: nothing to do", cfg.output)
    summary = JobSummary(
        input_rows=scan.rows, reports_labelled=totals["reports"], label_rows=totals["rows"],
        error_rows=totals["errors"], skipped_done=state.done_pairs, output=cfg.output,
        seconds=round(time.monotonic() - started, 2),
        actor_peak_rss_mb=totals.get("peak_rss_mb", 0.0),
        actor_peak_private_mb=totals.get("private_mb", 0.0), driver_peak_rss_mb=peak_rss_mb(),
        questions=totals.get("questions", 0), questions_remembered=totals.get("remembered", 0),
    )
    log.info("done: %s (code %s)", asdict(summary), code_version())
    return summary


def _run_pipeline(cfg: LabelJobConfig, setup: RunSetup, src, fmt: str, pairs_to_do: int,
                  state: resume.ResumeState) -> dict[str, float]:
    import ray
    import ray.data

    ensure_ray()
    where = actor_placement(cfg)
    log.info("labelling %d (report, condition) pairs; the first results come once the engine "
             "actors have started and loaded the model", pairs_to_do)
    engine = setup.engine
    if not where.use_gpu and engine.cpu_threads is None:
        engine = replace(engine, cpu_threads=where.cpu_threads)
    # The finished keys go to the object store once; the planning step reads them zero-copy.
    state_ref = ray.put(state)
    planned = _read_reports(cfg, src, fmt).map_batches(
        _plan_batch, fn_kwargs={"cfg": cfg, "fmt": fmt, "conditions": setup.condition_names,
                                "state": state_ref},
        batch_format="pandas", batch_size=None)
    # A read task's rows arrive as one block (a small CSV: one block in all), and an actor task
    # takes whole blocks: without this, one engine would label a whole block while the others
    # wait, and its results (and the progress line) would come only when it ends. Streaming.
    planned = planned.repartition(target_num_rows_per_block=cfg.reports_per_batch)
    stats = planned.map_batches(
        LabelActor,
        fn_constructor_kwargs={"cfg": cfg, "setup": replace(setup, engine=engine)},
        compute=ray.data.ActorPoolStrategy(min_size=_min_actors(cfg, where),
                                           max_size=where.max_workers),
        batch_size=cfg.reports_per_batch, batch_format="pandas",
        # Ray restarts a dead actor and re-runs its batch; a batch re-run replaces its files.
        max_restarts=cfg.engine_restarts, max_task_retries=-1, **where.remote_args(),
    )
    return _follow_progress(stats, pairs_to_do, cfg)


def _min_actors(cfg: LabelJobConfig, where: Placement) -> int:
    """Ray Data grows an actor pool only within the resources the cluster holds now, so on an
    autoscaling cluster a pool of one GPU engine would stay at one: GPU jobs ask for all their
    engines at the start, and the pool is released (the autoscaler removes the idle nodes) when
    the input is consumed."""
    wanted = cfg.min_actors if cfg.min_actors is not None else (
        where.max_workers if where.use_gpu else 1)
    return max(1, min(wanted, where.max_workers))


def _plan_batch(batch: pd.DataFrame, cfg: LabelJobConfig, fmt: str, conditions: list[str],
                state) -> pd.DataFrame:
    import ray

    if isinstance(state, ray.ObjectRef):
        state = ray.get(state)
    if fmt == "csv":
        batch = tables.decode_rows(batch, cfg.id_column, cfg.text_column, cfg.encoding)
    return resume.plan_batch(batch, cfg.id_column, cfg.text_column, conditions, state)


def _follow_progress(stats, expected_pairs: int, cfg: LabelJobConfig) -> dict[str, float]:
    """Drive the pipeline; show (report, condition) pairs done, rate and time left."""
    totals = {"reports": 0, "rows": 0, "errors": 0, "seen": 0, "pairs": 0, "questions": 0,
              "remembered": 0}
    peaks = {"peak_rss_mb": 0.0, "private_mb": 0.0}
    progress = Progress(expected_pairs, "pairs", cfg.progress_every_s)
    try:
        # No prefetch: a prefetching iterator hands a block over only once the next one is
        # ready too, so each result (and the line) came a whole batch late; a file of two
        # batches showed nothing until the end.
        for batch in stats.iter_batches(batch_size=None, batch_format="pandas",
                                        prefetch_batches=0):
            for key in totals:
                totals[key] += int(batch[key].sum())
            peaks = {k: max(v, float(batch[k].max())) for k, v in peaks.items()}
            progress.update(int(batch["pairs"].sum()))
    finally:
        progress.close()
    return {**totals, **peaks}
