"""The labelling job on a local Ray cluster (ray_app/pipeline/label_job.py, jobs/label_reports.py).

Ray on 2 cores hangs silently when its tasks are starved, so every test has a timeout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from frames import write_frame

from ray_app.engines import EngineConfig
from ray_app.engines.dry_run import DryRunEngine
from ray_app.evaluation.calibration import CalibrationError, build_calibration
from ray_app.labelling.conditions import load_condition
from ray_app.labelling.prompts import DEFAULT_TEMPLATE
from ray_app.pipeline import report_tables as tables
from ray_app.pipeline.label_job import LabelJobConfig, ResumeError, run_label_job
from ray_app.provenance import code_version

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parents[1]
LEVELS = ["L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"]
STENOSIS_QUESTIONS = [None, *LEVELS]  # the overall question, then one per level

REPORT_TEXTS = [
    "CLINICAL HISTORY: Low back pain for 3 months.\nFINDINGS: Normal alignment. Vertebral body "
    "heights are preserved. The conus ends at L1. No canal or foraminal stenosis.\n"
    "IMPRESSION: Normal MRI of the lumbar spine.",
    "CLINICAL HISTORY: Bilateral leg pain on walking.\nFINDINGS: At L4-L5 a broad disc bulge and "
    "facet hypertrophy cause moderate central canal stenosis. Other levels are unremarkable.\n"
    "IMPRESSION: Moderate central canal stenosis at L4-L5.",
    "CLINICAL HISTORY: Breast cancer, new back pain. ?metastasis.\nFINDINGS: Multiple T1 "
    "hypointense lesions in L2 and L4 vertebral bodies with enhancement, in keeping with "
    "metastases. No epidural extension.\nIMPRESSION: Vertebral metastases at L2 and L4.",
    "CLINICAL HISTORY: Right sciatica.\nFINDINGS: Right paracentral disc extrusion at L5-S1 "
    "contacting the traversing right S1 nerve root. The canal is otherwise capacious.\n"
    "IMPRESSION: L5-S1 disc extrusion affecting the right S1 root.",
    "CLINICAL HISTORY: Urinary retention and saddle anaesthesia.\nFINDINGS: Large central disc "
    "extrusion at L4-L5 severely narrows the canal and compresses the cauda equina.\n"
    "IMPRESSION: Severe L4-L5 canal stenosis with cauda equina compression. Urgent referral.",
    "CLINICAL HISTORY: Chronic back pain.\nFINDINGS: Typical haemangioma in the L3 vertebral "
    "body. Mild degenerative disc disease at L3-L4 without stenosis.\n"
    "IMPRESSION: Benign haemangioma at L3. Mild degeneration.",
    "CLINICAL HISTORY: Known myeloma.\nFINDINGS: Diffuse heterogeneous marrow signal with a "
    "pathological fracture of L1. Mild canal narrowing at L1-L2 from retropulsion.\n"
    "IMPRESSION: Myeloma involvement of the lumbar spine; L1 pathological fracture.",
    "CLINICAL HISTORY: Neurogenic claudication.\nFINDINGS: Severe multilevel central canal "
    "stenosis at L2-L3, L3-L4 and L4-L5 with ligamentum flavum thickening.\n"
    "IMPRESSION: Severe multilevel lumbar canal stenosis.",
    "CLINICAL HISTORY: Fall, back pain.\nFINDINGS: Acute wedge compression fracture of L1 with "
    "20% height loss. No retropulsion. Canal dimensions are normal.\n"
    "IMPRESSION: Acute osteoporotic L1 compression fracture without stenosis.",
    "CLINICAL HISTORY: Left leg pain.\nFINDINGS: Left foraminal disc protrusion at L3-L4 "
    "narrowing the left exit foramen. The central canal is patent.\n"
    "IMPRESSION: Left L3-L4 foraminal stenosis; no central canal stenosis.",
    "CLINICAL HISTORY: Follow-up after L4-L5 decompression.\nFINDINGS: Post laminectomy "
    "changes at L4-L5. The canal is now widely patent. No recurrent disc.\n"
    "IMPRESSION: Satisfactory decompression at L4-L5.",
    "CLINICAL HISTORY: Lymphoma staging.\nFINDINGS: Epidural soft tissue mass at L3 extending "
    "into the canal and moderately narrowing it, consistent with lymphomatous deposit.\n"
    "IMPRESSION: Epidural lymphoma at L3 with moderate canal stenosis.",
]
GOOD_IDS = [f"spine-{i:03d}" for i in range(1, len(REPORT_TEXTS) + 1)]


class FailingEngine(DryRunEngine):
    """Scores like the dry-run engine, but fails on any prompt holding BREAKER."""

    name = "failing"

    def score(self, conversations):
        if any(BREAKER in m["content"] for c in conversations for m in c):
            raise RuntimeError("the backend cannot score this report")
        return super().score(conversations)


BREAKER = "<<breaks-the-engine>>"


# --- helpers --------------------------------------------------------------------------------

def _good_rows() -> list[dict]:
    return [{"report_id": i, "text": t} for i, t in zip(GOOD_IDS, REPORT_TEXTS)]


def _bad_csv_rows() -> list[dict]:
    return [
        {"report_id": "", "text": "FINDINGS: Normal study. No id on this row."},
        {"report_id": "spine-dup", "text": "FINDINGS: Mild stenosis at L4-L5."},
        {"report_id": "spine-dup", "text": "FINDINGS: No stenosis."},
        {"report_id": "spine-empty", "text": ""},
        {"report_id": "spine-blank", "text": "   \n  "},
    ]


def _labels(output: str | Path) -> pd.DataFrame:
    return tables.read_finished(tables.locate(str(output)).child("labels"), None)


def _errors(output: str | Path) -> pd.DataFrame:
    return tables.read_finished(tables.locate(str(output)).child("errors"), None)


def _keys(labels: pd.DataFrame) -> list[tuple]:
    return list(zip(labels["report_id"], labels["condition"], labels["level"].fillna("")))


def _expected_keys(ids, conditions: dict[str, list]) -> set[tuple]:
    return {(i, c, lv or "") for i in ids for c, levels in conditions.items() for lv in levels}


def _dry_run(model: str = "dry-run-model") -> EngineConfig:
    return EngineConfig(engine="dry-run", model=model)


# --- (a) end to end on the tiny model -------------------------------------------------------

@pytest.mark.timeout(240)
def test_end_to_end_tiny_model_with_bad_rows(tmp_path, tiny_model_dir):
    reports = tmp_path / "reports.csv"
    pd.DataFrame(_good_rows()[:6] + _bad_csv_rows() + _good_rows()[6:]).to_csv(reports, index=False)
    conditions = ["spinal_cancer", "spinal_canal_stenosis"]
    cfg = LabelJobConfig(input=str(reports), output=str(tmp_path / "out"), conditions=conditions,
                         engine=EngineConfig(dtype="float32", model=str(tiny_model_dir), batch_size=4),
                         reports_per_batch=5)
    summary = run_label_job(cfg)

    labels = _labels(cfg.output)
    expected = _expected_keys(GOOD_IDS, {"spinal_cancer": [None],
                                         "spinal_canal_stenosis": STENOSIS_QUESTIONS})
    keys = _keys(labels)
    assert len(keys) == len(set(keys)) == len(GOOD_IDS) * 7
    assert set(keys) == expected
    assert summary.input_rows == len(GOOD_IDS) + 5
    assert (summary.reports_labelled, summary.label_rows) == (len(GOOD_IDS), len(GOOD_IDS) * 7)
    assert summary.error_rows == 5 and summary.skipped_done == 0

    # Provenance of every row.
    assert labels["score"].between(0, 1).all() and labels["score"].nunique() > 1
    assert (labels["model"] == str(tiny_model_dir)).all()
    assert (labels["engine"] == "transformers").all()
    assert (labels["method"] == "direct").all()
    assert (labels["prompt_hash"] == DEFAULT_TEMPLATE.template_hash("direct")).all()
    for name in conditions:
        hashes = labels.loc[labels["condition"] == name, "definition_hash"]
        assert (hashes == load_condition(name).definition_hash()).all()
    assert (labels["code_version"] == code_version()).all()
    assert labels["labelled_at"].map(lambda s: datetime.fromisoformat(s).tzinfo is not None).all()
    assert not labels["truncated"].any()
    assert labels["label"].isna().all() and labels["threshold"].isna().all()
    assert labels["calibration_id"].isna().all()

    # Bad rows: one error each, with the reason; the condition is empty (row-level problem).
    errors = _errors(cfg.output)
    assert len(errors) == 5 and errors["condition"].isna().all()
    reasons = errors.groupby(errors["report_id"].fillna("<none>"))["reason"].apply(list).to_dict()
    assert reasons["<none>"][0].startswith("missing id in column 'report_id'")
    assert len(reasons["spine-dup"]) == 2
    assert all(r.startswith("id appears 2 times") for r in reasons["spine-dup"])
    assert reasons["spine-empty"] == ["report text is empty"]
    assert reasons["spine-blank"] == ["report text is empty"]
    assert set(errors["row_key"]) == {
        tables.row_key(tables.clean_id(r["report_id"]), r["text"]) for r in _bad_csv_rows()}
    with_id = errors[errors["report_id"] == "spine-empty"]
    assert with_id["text_preview"].iloc[0] == ""

    # A rerun does nothing, and records no error twice.
    again = run_label_job(cfg)
    assert (again.reports_labelled, again.label_rows, again.error_rows) == (0, 0, 0)
    assert again.skipped_done == len(GOOD_IDS) * 2
    assert len(_labels(cfg.output)) == len(GOOD_IDS) * 7 and len(_errors(cfg.output)) == 5


@pytest.mark.timeout(240)
def test_jsonl_with_non_string_texts_does_not_fail_the_job(tmp_path, tiny_model_dir):
    rows = _good_rows()[:4] + [
        {"report_id": "spine-number", "text": 42},
        {"report_id": "spine-null", "text": None},
        {"report_id": "spine-list", "text": ["FINDINGS:", "normal"]},
        {"text": "FINDINGS: a report without an id key."},
        {"report_id": 77, "text": REPORT_TEXTS[5]},  # an integer id is fine: it becomes "77"
    ]
    reports = tmp_path / "reports.jsonl"
    reports.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = LabelJobConfig(input=str(reports), output=str(tmp_path / "out"),
                         conditions=["spinal_cancer"], reports_per_batch=3,
                         engine=EngineConfig(dtype="float32", model=str(tiny_model_dir), batch_size=4))
    summary = run_label_job(cfg)

    labels = _labels(cfg.output)
    assert sorted(labels["report_id"]) == sorted(GOOD_IDS[:4] + ["77"])
    assert summary.error_rows == 4 and summary.reports_labelled == 5
    reasons = dict(zip(_errors(cfg.output)["report_id"].fillna("<none>"),
                       _errors(cfg.output)["reason"]))
    assert reasons["spine-number"].startswith("report text is not text (got int)")
    assert reasons["spine-list"].startswith("report text is not text (got list)")
    assert reasons["spine-null"] == "report text is missing"
    assert reasons["<none>"].startswith("missing id")


# --- (b) formats and column names -----------------------------------------------------------

@pytest.mark.timeout(240)
@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_formats_with_custom_column_names(tmp_path, fmt):
    frame = pd.DataFrame({"accession": ["007", "0100", "12", "A-4"],
                          "report_text": REPORT_TEXTS[:4], "age": [61, 70, 44, 38]})
    path = write_frame(frame, tmp_path / f"reports.{fmt}")
    cfg = LabelJobConfig(input=str(path), output=str(tmp_path / "out"),
                         conditions=["spinal_cancer", "disc_herniation"], engine=_dry_run(),
                         id_column="accession", text_column="report_text", reports_per_batch=3)
    summary = run_label_job(cfg)
    labels = _labels(cfg.output)
    # CSV and JSONL ids like "007" stay strings.
    assert set(_keys(labels)) == _expected_keys(["007", "0100", "12", "A-4"],
                                                {"spinal_cancer": [None], "disc_herniation": [None]})
    assert len(labels) == 8 and summary.error_rows == 0
    assert (labels["engine"] == "dry-run").all()
    assert (labels["model"] == "dry-run:dry-run-model").all()


@pytest.mark.timeout(180)
def test_an_actor_asks_a_repeated_sentence_once_and_the_summary_counts_it(tmp_path):
    """Asked by sentence, "No fracture." recurs in three of four reports: one engine actor with
    remembered scores computes each of the 3 distinct sentences once, whatever the batches;
    with --remembered-scores 0 only repeats inside one batch of 2 are saved. Same labels."""
    texts = ["FINDINGS: No fracture. Mild stenosis at L4-L5.", "FINDINGS: No fracture. Normal "
             "alignment.", "FINDINGS: No fracture.", "FINDINGS: Mild stenosis at L4-L5."]
    path = write_frame(pd.DataFrame({"report_id": ["a", "b", "c", "d"], "text": texts}),
                       tmp_path / "reports.csv")
    base = LabelJobConfig(input=str(path), output="", conditions=["spinal_cancer"], unit="sentence",
                          engine=_dry_run(), reports_per_batch=2, min_actors=1, max_actors=1)
    summaries, labels = {}, {}
    for remembered in (10, 0):
        cfg = dataclasses.replace(base, output=str(tmp_path / f"out{remembered}"),
                                  remembered_scores=remembered)
        summaries[remembered] = run_label_job(cfg)
        labels[remembered] = _labels(cfg.output).sort_values("report_id")
    assert summaries[10].questions == summaries[0].questions == 6
    assert summaries[10].questions_remembered == 6 - 3
    assert summaries[0].questions_remembered < 3
    assert labels[10]["score"].tolist() == labels[0]["score"].tolist()
    assert labels[10]["evidence"].tolist() == labels[0]["evidence"].tolist()


@pytest.mark.timeout(120)
def test_wrong_column_name_fails_fast(tmp_path):
    path = tmp_path / "reports.csv"
    pd.DataFrame(_good_rows()).to_csv(path, index=False)
    cfg = LabelJobConfig(input=str(path), output=str(tmp_path / "out"),
                         conditions=["spinal_cancer"], engine=_dry_run(), text_column="body")
    with pytest.raises(KeyError, match="'body'.*--text-column"):
        run_label_job(cfg)


# --- (c) kill and resume --------------------------------------------------------------------

def _kill_session(pid: int) -> None:
    """SIGKILL the job's process group and anything else left in its session (Ray daemons
    that moved to their own process group)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    import psutil

    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == pid:
                proc.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


def _session_processes(pid: int) -> list[int]:
    import psutil

    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == pid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return alive


@pytest.mark.timeout(480)
def test_kill_and_resume_through_the_cli(tmp_path, tiny_model_dir):
    ids = [f"r{i:03d}" for i in range(40)]
    rows = [{"report_id": i, "text": REPORT_TEXTS[n % len(REPORT_TEXTS)] + f"\nAccession {i}."}
            for n, i in enumerate(ids)]
    reports = tmp_path / "reports.csv"
    pd.DataFrame(rows).to_csv(reports, index=False)
    output = tmp_path / "out"
    command = [sys.executable, str(REPO / "jobs" / "label_reports.py"), "--input", str(reports),
               "--output", str(output), "--conditions", "spinal_cancer", "spinal_canal_stenosis",
               "--model", str(tiny_model_dir), "--batch-size", "4", "--reports-per-batch", "2"]
    # RAY_ADDRESS=local: the job starts its own Ray instead of joining this module's cluster.
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = open(tmp_path / "first.log", "w")
    job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    labels_dir = output / "labels"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            if labels_dir.is_dir() and any(p.name.startswith("part-") for p in labels_dir.iterdir()):
                break
            time.sleep(0.05)
        assert job.poll() is None, f"job ended before it was killed:\n{_tail(tmp_path / 'first.log')}"
        assert labels_dir.is_dir(), f"no labels after 300 s:\n{_tail(tmp_path / 'first.log')}"
    finally:
        _kill_session(job.pid)
        job.wait(timeout=30)
        log.close()
    time.sleep(1)
    assert _session_processes(job.pid) == [], "killed job left processes behind"

    done_at_kill = _labels(output)
    pairs_at_kill = set(zip(done_at_kill["report_id"], done_at_kill["condition"]))
    assert 0 < len(pairs_at_kill) < 80, "the kill came too late to test resumption"

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300, start_new_session=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = re.search(r"JobSummary\((.*)\)", second.stdout)
    assert summary, second.stdout[-2000:]
    fields = dict(kv.split("=", 1) for kv in summary.group(1).split(", "))
    assert int(fields["skipped_done"]) == len(pairs_at_kill)
    assert int(fields["input_rows"]) == 40 and int(fields["error_rows"]) == 0

    labels = _labels(output)
    keys = _keys(labels)
    assert len(keys) == len(set(keys)), "a resumed job duplicated rows"
    assert set(keys) == _expected_keys(ids, {"spinal_cancer": [None],
                                             "spinal_canal_stenosis": STENOSIS_QUESTIONS})
    # The rows written before the kill were kept, not rewritten.
    before = set(done_at_kill["labelled_at"] + done_at_kill["report_id"])
    assert before <= set(labels["labelled_at"] + labels["report_id"])


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text()[-n:] if path.exists() else ""


# --- (d) manifest checks --------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_resume_refuses_another_setup_and_accepts_new_conditions(tmp_path):
    reports = tmp_path / "reports.csv"
    pd.DataFrame(_good_rows()).to_csv(reports, index=False)
    base = LabelJobConfig(input=str(reports), output=str(tmp_path / "out"),
                          conditions=["spinal_cancer"], engine=_dry_run("model-a"),
                          reports_per_batch=5)
    run_label_job(base)
    first = _labels(base.output)
    assert len(first) == len(GOOD_IDS)

    with pytest.raises(ResumeError, match=r"holds labels made with a different model; write "
                                          r"to a new --output folder"):
        run_label_job(dataclasses.replace(base, engine=_dry_run("model-b")))

    # The same condition name with another definition (a user's YAML).
    spec = tmp_path / "my_cancer.yaml"
    spec.write_text("name: spinal_cancer\ndefinition: Any tumour of the spine, benign or "
                    "malignant.\ndrop_sections: [history]\n")
    with pytest.raises(ResumeError, match="different definition of spinal_cancer"):
        run_label_job(dataclasses.replace(base, conditions=[str(spec)]))

    with pytest.raises(ResumeError, match="different method"):
        run_label_job(dataclasses.replace(base, method="summary"))
    assert len(_labels(base.output)) == len(GOOD_IDS), "a refused run must write nothing"

    # Adding a condition labels only the new one.
    more = run_label_job(dataclasses.replace(base, conditions=["spinal_cancer", "disc_herniation"]))
    assert more.skipped_done == len(GOOD_IDS)
    assert more.reports_labelled == len(GOOD_IDS) and more.label_rows == len(GOOD_IDS)
    labels = _labels(base.output)
    keys = _keys(labels)
    assert len(keys) == len(set(keys)) == 2 * len(GOOD_IDS)
    assert set(keys) == _expected_keys(GOOD_IDS, {"spinal_cancer": [None],
                                                  "disc_herniation": [None]})
    cancer = labels[labels["condition"] == "spinal_cancer"].sort_values("report_id")
    assert cancer["labelled_at"].tolist() == first.sort_values("report_id")["labelled_at"].tolist()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(manifest["conditions"]) == {"spinal_cancer", "disc_herniation"}
    assert manifest["model"] == "dry-run:model-a"


@pytest.mark.timeout(120)
def test_dry_run_labels_never_mix_with_a_model(tmp_path, tiny_model_dir):
    # Same model path, but hash scores from the dry-run engine: resuming with the real engine
    # would keep the dry-run scores as if the model had made them.
    reports = tmp_path / "reports.csv"
    pd.DataFrame(_good_rows()[:2]).to_csv(reports, index=False)
    cfg = LabelJobConfig(input=str(reports), output=str(tmp_path / "out"),
                         conditions=["spinal_cancer"], engine=_dry_run(str(tiny_model_dir)))
    run_label_job(cfg)
    with pytest.raises(ResumeError, match="different model"):
        run_label_job(dataclasses.replace(cfg, engine=EngineConfig(model=str(tiny_model_dir))))


# --- (e) calibration ------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_calibrated_labels_and_refused_calibration(tmp_path, tiny_model_dir):
    reports = tmp_path / "reports.csv"
    pd.DataFrame(_good_rows()).to_csv(reports, index=False)
    engine = EngineConfig(dtype="float32", model=str(tiny_model_dir), batch_size=4)
    conditions = ["spinal_cancer", "spinal_canal_stenosis"]
    first = LabelJobConfig(input=str(reports), output=str(tmp_path / "scores"),
                           conditions=conditions, engine=engine, reports_per_batch=6)
    run_label_job(first)
    scores = _labels(first.output)

    # Made-up truth: every other report is positive, for every question.
    truth = scores[["report_id", "condition", "level"]].assign(
        label=[int(GOOD_IDS.index(r) % 2 == 0) for r in scores["report_id"]])
    # build_calibration merges on a column named "label", which the job's own (empty) label
    # column collides with (label_x/label_y, KeyError): drop it first. See the report.
    calibration = build_calibration(scores.drop(columns=["label"]), truth)
    assert len(calibration.entries) == 7
    cal_path = tmp_path / "calibration.json"
    calibration.save(cal_path)

    second = dataclasses.replace(first, output=str(tmp_path / "labels"), calibration=str(cal_path))
    run_label_job(second)
    labels = _labels(second.output)
    assert len(labels) == len(GOOD_IDS) * 7
    assert labels["label"].notna().all() and labels["threshold"].notna().all()
    assert (labels["calibration_id"] == calibration.calibration_id).all()
    thresholds = {(e.condition, e.level or ""): e.threshold for e in calibration.entries}
    expected = [thresholds[(c, lv)] for c, lv in zip(labels["condition"], labels["level"].fillna(""))]
    assert labels["threshold"].tolist() == expected
    assert (labels["label"] == (labels["score"] >= labels["threshold"])).all()

    # A calibration made for another model is refused before anything is written.
    other = dataclasses.replace(calibration, model="another-model")
    other_path = tmp_path / "other.json"
    other.save(other_path)
    refused = dataclasses.replace(first, output=str(tmp_path / "refused"),
                                  calibration=str(other_path))
    started = time.monotonic()
    with pytest.raises(CalibrationError, match="does not apply to: model"):
        run_label_job(refused)
    assert time.monotonic() - started < 10
    assert not (tmp_path / "refused").exists()

    # ...and so is one missing a condition of the job.
    with pytest.raises(CalibrationError, match="'disc_herniation' \\(not in this calibration\\)"):
        run_label_job(dataclasses.replace(refused, conditions=[*conditions, "disc_herniation"],
                                          calibration=str(cal_path)))
    assert not (tmp_path / "refused").exists()


# --- (f) truncation -------------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_long_report_is_shortened_flagged_and_labelled(tmp_path, tiny_model_dir):
    long_text = ("CLINICAL HISTORY: Back pain.\nFINDINGS: "
                 + " ".join(f"At level {n} the disc is desiccated with a small bulge and no "
                            "stenosis." for n in range(40))
                 + "\nIMPRESSION: Severe central canal stenosis at L4-L5.")
    rows = [{"report_id": "short", "text": REPORT_TEXTS[1]},
            {"report_id": "long", "text": long_text}]
    reports = tmp_path / "reports.csv"
    pd.DataFrame(rows).to_csv(reports, index=False)
    cfg = LabelJobConfig(input=str(reports), output=str(tmp_path / "out"),
                         conditions=["spinal_canal_stenosis"],
                         engine=EngineConfig(dtype="float32", model=str(tiny_model_dir), batch_size=4,
                                             max_context_tokens=420))
    summary = run_label_job(cfg)
    labels = _labels(cfg.output)
    assert summary.error_rows == 0 and len(labels) == 12
    truncated = labels.groupby("report_id")["truncated"].agg(["all", "any"])
    assert truncated.loc["long", "all"] and not truncated.loc["short", "any"]
    assert labels["score"].between(0, 1).all()


# --- (g) one report that breaks the engine --------------------------------------------------

@pytest.mark.timeout(240)
def test_engine_failure_sends_only_that_report_to_errors(tmp_path):
    rows = _good_rows()[:6]
    rows.insert(2, {"report_id": "spine-breaker",
                    "text": f"FINDINGS: {BREAKER} Normal alignment.\nIMPRESSION: Normal."})
    reports = tmp_path / "reports.csv"
    pd.DataFrame(rows).to_csv(reports, index=False)
    cfg = LabelJobConfig(input=str(reports), output=str(tmp_path / "out"),
                         conditions=["spinal_cancer", "disc_herniation"], reports_per_batch=4,
                         engine=EngineConfig(engine="test_label_job:FailingEngine", model="m"))
    summary = run_label_job(cfg)
    labels = _labels(cfg.output)
    assert sorted(set(labels["report_id"])) == GOOD_IDS[:6]
    assert len(labels) == 12 and (labels["engine"] == "failing").all()
    errors = _errors(cfg.output)
    assert set(errors["report_id"]) == {"spine-breaker"}
    assert sorted(errors["condition"]) == ["disc_herniation", "spinal_cancer"]
    assert errors["reason"].str.startswith(
        "engine failed: RuntimeError: the backend cannot score this report").all()
    assert summary.error_rows == 2 and summary.reports_labelled == 7

    # Engine failures are per condition, so a rerun tries that report again (and only it).
    again = run_label_job(cfg)
    assert (again.reports_labelled, again.label_rows, again.error_rows) == (1, 0, 2)


# --- (h) an engine that is dead, not a bad report -------------------------------------------

@pytest.mark.timeout(300)
def test_dead_engine_stops_the_job_with_its_cause_and_a_rerun_resumes(tmp_path):
    from ray_app.pipeline.label_job import EngineFailedError

    reports = tmp_path / "reports.csv"
    pd.DataFrame(_good_rows()).to_csv(reports, index=False)
    flag = tmp_path / "gpu-broken"
    engine = EngineConfig(engine="fault_engines:DeadEngine", model="m",
                          engine_kwargs={"broken_flag": str(flag)})
    cfg = LabelJobConfig(input=str(reports), output=str(tmp_path / "out"),
                         conditions=["spinal_cancer"], reports_per_batch=2, engine=engine,
                         engine_restarts=1)
    first = run_label_job(dataclasses.replace(cfg, limit=4))
    assert first.label_rows == 4

    flag.touch()  # the GPU goes bad: every call fails, whatever the report
    with pytest.raises(EngineFailedError) as failure:
        run_label_job(cfg)
    message = str(failure.value)
    assert "CUDA error: an illegal memory access" in message and "rerun" in message
    assert "died 2 time(s)" in message  # the first process and its one restart
    assert _errors(cfg.output).empty, "a dead engine's failures were blamed on reports"
    assert len(_labels(cfg.output)) == 4, "rows written before the fault were lost"

    flag.unlink()  # fixed: the same command resumes
    again = run_label_job(cfg)
    assert (again.skipped_done, again.label_rows, again.error_rows) == (4, 8, 0)
    keys = _keys(_labels(cfg.output))
    assert sorted(keys) == sorted(_expected_keys(GOOD_IDS, {"spinal_cancer": [None]}))


# --- (i) rows that cannot be read cost only themselves (through the CLI) --------------------

def _run_cli(tmp_path, *args):
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(REPO / "jobs" / "label_reports.py"), *args,
               "--conditions", "cardiomegaly", "--engine", "dry-run", "--model", "m"]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240, start_new_session=True)


def _cp1252_row_csv(path: Path) -> None:
    """A UTF-8 export with one row pasted in from a Windows (cp1252) system."""
    path.write_bytes("report_id,text\n00123,FINDINGS: Heart size normal.\n".encode()
                     + "r2,C\xe9ur \xe9largi.\n".encode("cp1252")
                     + "r3,Cœur normal.\n".encode())


@pytest.mark.timeout(300)
def test_a_row_in_another_encoding_goes_to_errors_and_the_rest_is_labelled(tmp_path):
    _cp1252_row_csv(tmp_path / "mixed.csv")
    run = _run_cli(tmp_path, "--input", "mixed.csv", "--output", "out")
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(_labels(tmp_path / "out")["report_id"]) == ["00123", "r3"]  # '00123' kept
    errors = _errors(tmp_path / "out")
    assert errors["report_id"].tolist() == ["r2"]
    assert re.match(r"text of report r2 is not valid utf-8 .*\\xe9.*pass --encoding",
                    errors["reason"][0])

    whole = tmp_path / "windows.csv"  # a file wholly in cp1252: --encoding reads every row
    whole.write_bytes("report_id,text\nr1,C\xe9ur \xe9largi.\nr2,Normal.\n".encode("cp1252"))
    run = _run_cli(tmp_path, "--input", "windows.csv", "--output", "out2", "--encoding", "cp1252")
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(_labels(tmp_path / "out2")["report_id"]) == ["r1", "r2"]
    assert _errors(tmp_path / "out2").empty


@pytest.mark.timeout(300)
def test_json_lines_that_cannot_be_read_go_to_errors_with_their_line(tmp_path):
    (tmp_path / "reports.jsonl").write_bytes(
        b'{"report_id": "00123", "text": "FINDINGS: Normal."}\n{not json}\n[1, 2]\n'
        b'{"report_id": "r4", "text": "C\xe9ur"}\n{"text": "no id"}\n'
        b'{"report_id": "r6", "text": "Cardiomegaly."}\n')
    run = _run_cli(tmp_path, "--input", "reports.jsonl", "--output", "out")
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(_labels(tmp_path / "out")["report_id"]) == ["00123", "r6"]
    reasons = sorted(_errors(tmp_path / "out")["reason"])
    assert len(reasons) == 4
    assert any(r.startswith("line 2 of ") and "is not JSON" in r and "fix or remove" in r
               for r in reasons)
    assert any(r.startswith("line 3 of ") and "not a JSON object" in r for r in reasons)
    assert any(r.startswith("line 4 of ") and "not valid utf-8" in r for r in reasons)
    assert any(r.startswith("missing id") for r in reasons)
    again = _run_cli(tmp_path, "--input", "reports.jsonl", "--output", "out")
    assert again.returncode == 0 and "error_rows=0" in again.stdout  # reported once


# --- (j) a batch that Ray re-runs after it was written ---------------------------------------

@pytest.mark.timeout(120)
def test_a_batch_run_twice_writes_its_rows_once(tmp_path):
    """Ray re-runs a batch whose actor died after writing it and before returning: the second
    run replaces the first run's files instead of adding rows."""
    from ray_app.pipeline import resume
    from ray_app.pipeline.label_job import LabelActor, run_setup

    cfg = LabelJobConfig(input="unused.csv", output=str(tmp_path / "out"),
                         conditions=["spinal_cancer"], engine=_dry_run())
    nothing_done = resume.ResumeState(resume.KeyIndex.build([]), resume.KeyIndex.build([]),
                                      {"spine-dup": 2})
    rows = _good_rows()[:3] + [{"report_id": "spine-dup", "text": "FINDINGS: Mild stenosis."}]
    batch = resume.plan_batch(pd.DataFrame(rows), "report_id", "text", ["spinal_cancer"],
                              nothing_done)
    actor = LabelActor(cfg, run_setup(cfg))
    actor(batch)
    actor(batch.iloc[::-1].reset_index(drop=True))  # the re-run, rows in another order
    assert len(list((tmp_path / "out" / "labels").glob("part-*.parquet"))) == 1
    assert sorted(_labels(cfg.output)["report_id"]) == GOOD_IDS[:3]
    assert _errors(cfg.output)["report_id"].tolist() == ["spine-dup"]
    actor(batch.iloc[:2])  # another batch: another file
    assert len(list((tmp_path / "out" / "labels").glob("part-*.parquet"))) == 2


@pytest.mark.timeout(240)
def test_one_small_csv_is_shared_by_every_engine_batch_by_batch(tmp_path, caplog):
    """A single CSV reads as one block; the job cuts it into batches so that every engine actor
    gets work and each batch's result (and the progress line) comes when that batch is done."""
    reports = tmp_path / "reports.csv"
    pd.DataFrame(_good_rows() * 1).to_csv(reports, index=False)
    record = tmp_path / "where"
    cfg = LabelJobConfig(
        input=str(reports), output=str(tmp_path / "out"), conditions=["spinal_cancer"],
        reports_per_batch=2, min_actors=2, max_actors=2, cpus_per_actor=0.5,
        progress_every_s=0.0,
        engine=EngineConfig(engine="fault_engines:RecordingEngine", model="m",
                            engine_kwargs={"record_dir": str(record), "seconds_per_call": 0.3}))
    with caplog.at_level(logging.INFO, logger="ray_app.pipeline.progress"):
        summary = run_label_job(cfg)
    assert summary.reports_labelled == len(GOOD_IDS)
    batches = -(-len(GOOD_IDS) // 2)
    lines = [r for r in caplog.records if r.name == "ray_app.pipeline.progress"]
    assert len(lines) >= batches - 1  # one line per finished batch (the last may be the summary)
    calls = _calls(record)
    assert len(calls) == 2 and all(calls.values())  # both engines scored
    sizes = [n for c in calls.values() for n, _ in c]  # questions per call: one a report
    assert sum(sizes) == len(GOOD_IDS) and max(sizes) <= 2  # batches of at most 2 reports


def _calls(record: Path) -> dict[str, list[tuple[int, float]]]:
    """RecordingEngine's calls per actor: (questions, time the call ended)."""
    return {p.stem: [(int(n), float(t)) for n, t in (line.split() for line in
                                                     p.read_text().splitlines())]
            for p in record.glob("*.calls")}


@pytest.mark.timeout(240)
def test_a_batch_s_progress_line_comes_when_that_batch_is_done(tmp_path, caplog):
    """One engine, three batches: the first line must not wait for the second batch (a
    prefetching iterator held each result back until the next one was ready)."""
    reports = tmp_path / "reports.csv"
    pd.DataFrame(_good_rows()[:3]).to_csv(reports, index=False)
    record = tmp_path / "where"
    cfg = LabelJobConfig(
        input=str(reports), output=str(tmp_path / "out"), conditions=["spinal_cancer"],
        reports_per_batch=1, min_actors=1, max_actors=1, progress_every_s=0.0,
        engine=EngineConfig(engine="fault_engines:RecordingEngine", model="m",
                            engine_kwargs={"record_dir": str(record), "seconds_per_call": 2.0}))
    with caplog.at_level(logging.INFO, logger="ray_app.pipeline.progress"):
        run_label_job(cfg)
    (ends,) = [[t for _, t in c] for c in _calls(record).values()]
    first_line = min(r.created for r in caplog.records if r.name == "ray_app.pipeline.progress")
    assert len(ends) == 3 and first_line < sorted(ends)[1] - 1.0
