"""Every bad input ends a job with one line on stderr and no traceback (ray_app/pipeline/cli.py).

Each case runs the job as a user does (`python jobs/<job>.py ...` in a subprocess) and checks:
exit code 2 for an input error (1 for a failed job), exactly one message line (`<job>: ...`),
the last thing on stderr, naming the input, and no "Traceback" unless --debug is given. The
label job's input errors are found before Ray starts and before the output folder is written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_app.pipeline import cli
from ray_app.pipeline.report_tables import LABEL_SCHEMA

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT = 100  # seconds for one job subprocess; most take 3-10 s on 2 busy cores
RAY_STARTED = "Started a local Ray instance"
BINARY = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # an image saved as .csv


def run(job: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO),
                   **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), *args], cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=JOB_TIMEOUT)


def one_line_error(result: subprocess.CompletedProcess, job: str, code: int = cli.EXIT_INPUT,
                   *names: str) -> str:
    """The job's message: exactly one `<job>: ` line, the last on stderr, naming `names`."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{job}: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == lines[0]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def reports(tmp_path) -> Path:
    path = tmp_path / "reports.csv"
    pd.DataFrame({"report_id": ["r1", "r2"],
                  "text": ["FINDINGS: Fracture of L1.", "FINDINGS: Normal."]}).to_csv(path,
                                                                                    index=False)
    return path


def label(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The label job with the dry-run engine (no model loads) and the given flags."""
    flags = {"--output": str(tmp_path / "out"), "--conditions": "fracture"}
    command = [*args] + [x for k, v in flags.items() if k not in args for x in (k, v)]
    return run("label_reports", *command, "--engine", "dry-run", "--model", "m", cwd=tmp_path,
               env=env)


def assert_label_input_error(tmp_path: Path, result, *names: str) -> str:
    line = one_line_error(result, "label_reports", cli.EXIT_INPUT, *names)
    assert RAY_STARTED not in result.stderr  # refused before Ray starts
    assert not (tmp_path / "out").exists()  # ... and before the output is written
    return line


# ---------------------------------------------------------------- the label job's bad inputs


@pytest.mark.timeout(120)
def test_label_missing_input(tmp_path):
    missing = tmp_path / "nope.csv"
    line = assert_label_input_error(tmp_path, label(tmp_path, "--input", str(missing)),
                                    str(missing))
    assert "does not exist" in line


@pytest.mark.timeout(120)
def test_label_empty_input(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    line = assert_label_input_error(tmp_path, label(tmp_path, "--input", str(empty)), str(empty))
    assert "is empty" in line


@pytest.mark.timeout(120)
def test_label_binary_input(tmp_path):
    binary = tmp_path / "scan.csv"
    binary.write_bytes(BINARY)
    line = assert_label_input_error(tmp_path, label(tmp_path, "--input", str(binary)),
                                    str(binary))
    assert "binary data" in line and line.isprintable()


@pytest.mark.timeout(120)
def test_label_wrong_id_column(tmp_path, reports):
    result = label(tmp_path, "--input", str(reports), "--id-column", "accession")
    line = assert_label_input_error(tmp_path, result, "'accession'", str(reports))
    assert "--id-column" in line and "['report_id', 'text']" in line


@pytest.mark.timeout(120)
def test_label_wrong_text_column(tmp_path, reports):
    result = label(tmp_path, "--input", str(reports), "--text-column", "body")
    assert_label_input_error(tmp_path, result, "'body'", str(reports), "--text-column")


@pytest.mark.timeout(120)
def test_label_unknown_condition(tmp_path, reports):
    result = label(tmp_path, "--input", str(reports), "--conditions", "fractur")
    line = assert_label_input_error(tmp_path, result, "unknown condition 'fractur'")
    assert "did you mean 'fracture'" in line


@pytest.mark.timeout(120)
def test_label_condition_without_definition(tmp_path, reports):
    spec = tmp_path / "my_condition.yaml"
    spec.write_text("name: foraminal_stenosis\nlevels: [L4-L5]\n")
    result = label(tmp_path, "--input", str(reports), "--conditions", str(spec))
    assert_label_input_error(tmp_path, result, str(spec), "'definition'", "add one sentence")


@pytest.mark.timeout(120)
def test_label_unreadable_calibration(tmp_path, reports):
    calibration = tmp_path / "cal.json"
    calibration.write_text("threshold: 0.5\n")  # YAML, not the JSON calibrate.py writes
    result = label(tmp_path, "--input", str(reports), "--calibration", str(calibration))
    assert_label_input_error(tmp_path, result, str(calibration), "not JSON", "jobs/calibrate.py")


@pytest.mark.timeout(120)
def test_label_output_folder_cannot_be_created(tmp_path, reports):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    output = blocker / "out"  # a file stands where a folder must be
    result = label(tmp_path, "--input", str(reports), "--output", str(output))
    line = one_line_error(result, "label_reports", cli.EXIT_INPUT, str(output), "--output")
    assert "cannot create output folder" in line and RAY_STARTED not in result.stderr


@pytest.mark.timeout(60)
def test_label_unreachable_s3_endpoint(tmp_path):
    dummy = {"AWS_ACCESS_KEY_ID": "dummy", "AWS_SECRET_ACCESS_KEY": "dummy",
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    endpoint = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused
    result = label(tmp_path, "--input", "s3://bucket/x.csv", "--s3-endpoint", endpoint, env=dummy)
    line = assert_label_input_error(tmp_path, result, f"cannot reach S3 endpoint {endpoint}")
    assert "check --s3-endpoint and the AWS credentials" in line


@pytest.mark.timeout(120)
def test_label_unknown_config_field(tmp_path, reports):
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {reports}\nreports_per_bach: 8\n")
    result = label(tmp_path, "--config", str(config))
    assert_label_input_error(tmp_path, result, str(config), "reports_per_bach")


@pytest.mark.timeout(120)
def test_debug_prints_the_traceback_too(tmp_path):
    missing = tmp_path / "nope.csv"
    result = label(tmp_path, "--input", str(missing), "--debug")
    assert result.returncode == cli.EXIT_INPUT
    assert "Traceback (most recent call last)" in result.stderr
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith("label_reports: input ") and str(missing) in last


# ---------------------------------------------------------------------- the other jobs


def write_label_folder(folder: Path, model: str = "m", definition: str = "d1") -> None:
    """A labelling job's output with 20 scored rows of `fracture` (no model, no Ray)."""
    n = 20
    rows = {name: [None] * n for name in LABEL_SCHEMA.names}
    rows.update(report_id=[f"r{i}" for i in range(n)], condition=["fracture"] * n,
                level=[""] * n, method=["direct"] * n, score=[i / n for i in range(n)],
                model=[model] * n, engine=["transformers"] * n,
                definition_hash=[definition] * n, prompt_hash=["p"] * n)
    (folder / "labels").mkdir(parents=True)
    pq.write_table(pa.Table.from_pydict(rows, schema=LABEL_SCHEMA),
                   folder / "labels" / "part-0.parquet")


def write_truth(path: Path) -> Path:
    pd.DataFrame({"report_id": [f"r{i}" for i in range(20)], "condition": "fracture",
                  "level": "", "label": [int(i >= 10) for i in range(20)]}).to_csv(path,
                                                                                  index=False)
    return path


@pytest.mark.timeout(120)
def test_calibrate_missing_labels(tmp_path):
    truth = write_truth(tmp_path / "truth.csv")
    result = run("calibrate", "--labels", str(tmp_path / "nope"), "--truth", str(truth),
                 "--out", str(tmp_path / "cal.json"), cwd=tmp_path)
    one_line_error(result, "calibrate", cli.EXIT_INPUT, str(tmp_path / "nope"), "does not exist")


@pytest.mark.timeout(120)
def test_calibrate_refuses_folders_of_different_setups(tmp_path):
    qwen, smol = tmp_path / "qwen", tmp_path / "smol"
    write_label_folder(qwen, model="qwen", definition="d1")
    write_label_folder(smol, model="smollm", definition="d2")
    truth = write_truth(tmp_path / "truth.csv")
    result = run("calibrate", "--labels", str(qwen), str(smol), "--truth", str(truth),
                 "--out", str(tmp_path / "cal.json"), cwd=tmp_path)
    line = one_line_error(result, "calibrate", cli.EXIT_INPUT,
                          f"model: 'qwen' (in {qwen}) vs 'smollm' (in {smol})",
                          f"definition of fracture: 'd1' (in {qwen}) vs 'd2' (in {smol})")
    assert "engine" not in line.split(". A calibration")[0]  # the same engine is not listed
    assert not (tmp_path / "cal.json").exists()


@pytest.mark.timeout(120)
def test_evaluate_missing_run(tmp_path):
    truth = write_truth(tmp_path / "truth.csv")
    result = run("evaluate", "--run", f"a={tmp_path / 'nope'}", "--truth", str(truth),
                 "--out", str(tmp_path / "eval"), cwd=tmp_path)
    one_line_error(result, "evaluate", cli.EXIT_INPUT, str(tmp_path / "nope"))


@pytest.mark.timeout(120)
def test_export_review_missing_reports(tmp_path):
    write_label_folder(tmp_path / "labelled")
    missing = tmp_path / "nope.csv"
    result = run("export_review", "--labels", str(tmp_path / "labelled"), "--reports",
                 str(missing), "--out", str(tmp_path / "review.csv"), cwd=tmp_path)
    one_line_error(result, "export_review", cli.EXIT_INPUT, str(missing))


@pytest.mark.timeout(120)
def test_select_prompt_missing_input(tmp_path):
    truth = write_truth(tmp_path / "truth.csv")
    missing = tmp_path / "nope.csv"
    result = run("select_prompt", "--prompts", str(REPO / "configs/prompt_variants.yaml"),
                 "--truth", str(truth), "--out", str(tmp_path / "select"), "--input",
                 str(missing), "--conditions", "fracture", "--engine", "dry-run", "--model", "m",
                 cwd=tmp_path)
    one_line_error(result, "select_prompt", cli.EXIT_INPUT, str(missing))
    assert RAY_STARTED not in result.stderr


@pytest.mark.timeout(120)
def test_finetune_missing_config(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = run("finetune", "--config", str(missing), cwd=tmp_path)
    one_line_error(result, "finetune", cli.EXIT_INPUT, str(missing))


@pytest.mark.timeout(120)
def test_embed_discs_missing_dicom(tmp_path):
    locations = tmp_path / "discs.csv"
    locations.write_text("study_uid,series_uid,level,slice_index,x,y\n")
    missing = tmp_path / "no_dicom"
    result = run("embed_discs", "--dicom", str(missing), "--locations", str(locations),
                 "--output", str(tmp_path / "emb"), "--allow-random-weights", cwd=tmp_path)
    one_line_error(result, "embed_discs", cli.EXIT_INPUT, str(missing))
    assert RAY_STARTED not in result.stderr and not (tmp_path / "emb").exists()


@pytest.mark.timeout(120)
def test_train_mri_classifier_missing_embeddings(tmp_path):
    missing = tmp_path / "no_emb"
    result = run("train_mri_classifier", "--embeddings", str(missing), "--labels",
                 str(write_truth(tmp_path / "truth.csv")), "--output", str(tmp_path / "clf"),
                 "--condition", "fracture", cwd=tmp_path)
    one_line_error(result, "train_mri_classifier", cli.EXIT_INPUT, str(missing),
                   "jobs/embed_discs.py")


@pytest.mark.timeout(120)
def test_train_cnn_missing_images(tmp_path):
    missing = tmp_path / "images.csv"
    result = run("train_cnn", "--images", str(missing), "--output", str(tmp_path / "cnn"),
                 "--allow-random-weights", cwd=tmp_path)
    one_line_error(result, "train_cnn", cli.EXIT_INPUT, str(missing))
    assert RAY_STARTED not in result.stderr


@pytest.mark.timeout(120)
def test_make_phantoms_output_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run("make_phantoms", "--output", str(blocker / "phantoms"), "--studies", "1",
                 cwd=tmp_path)
    one_line_error(result, "make_phantoms", cli.EXIT_INPUT, str(blocker / "phantoms"),
                   "--output")


# ------------------------------------------------------ the mechanism itself, in-process


@pytest.mark.timeout(60)
def test_a_failed_job_is_one_line_with_exit_1(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text("from ray_app.pipeline.cli import run_job\n"
                      "def main(argv):\n"
                      "    raise RuntimeError('disk on fire\\nsecond line')\n"
                      "run_job(main)\n")
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(script)], env=environment, capture_output=True,
                            text=True, timeout=JOB_TIMEOUT)
    line = one_line_error(result, "boom", cli.EXIT_FAILED)
    assert line == ("boom: failed: RuntimeError: disk on fire second line "
                    "(rerun with --debug for the traceback)")


def test_engine_failure_keeps_its_message():
    from ray_app.pipeline.label_job import EngineFailedError

    line, code = cli.describe_failure(
        "label_reports", EngineFailedError("the engine died 4 time(s); last cause: CUDA error"))
    assert code == cli.EXIT_FAILED
    assert line.startswith("label_reports: failed: EngineFailedError: the engine died 4 time(s); "
                           "last cause: CUDA error")


def test_ray_wrapped_errors_are_unwrapped_to_the_worker_exception():
    from ray.exceptions import ActorDiedError, RayTaskError

    from ray_app.labelling.conditions import ConditionError

    remote = ("ray::MapBatches(LabelActor)() (pid=1, ip=10.0.0.1)\n"
              '  File "/x/label_job.py", line 9, in __init__\n'
              "ray_app.labelling.conditions.ConditionError: unknown condition 'x'")
    wrapped = RayTaskError("f", remote, ConditionError("unknown condition 'x'"))
    assert cli.describe_failure("job", wrapped.as_instanceof_cause()) == (
        "job: unknown condition 'x'", cli.EXIT_INPUT)
    # an actor that died in its constructor: Ray keeps only the text of the error
    died = ActorDiedError()
    died.error_msg = "The actor died because of an error raised in its creation task, " + remote
    assert cli.describe_failure("job", died) == ("job: unknown condition 'x'", cli.EXIT_INPUT)
    crashed = RayTaskError("f", remote.replace("ray_app.labelling.conditions.ConditionError",
                                               "ZeroDivisionError"), None)
    line, code = cli.describe_failure("job", crashed, debug=True)
    assert (line, code) == ("job: failed: ZeroDivisionError: unknown condition 'x'",
                            cli.EXIT_FAILED)


def test_messages_are_one_printable_line():
    assert cli.describe_failure("job", KeyError("k"))[0].startswith("job: failed: KeyError: k ")
    err = cli.ColumnError("column 'x' not in t.csv")
    assert isinstance(err, KeyError) and str(err) == "column 'x' not in t.csv"
    assert cli.one_line("a\n  b\x00c\n") == "a b\\x00c"
    line, code = cli.describe_failure("job", FileNotFoundError(2, "No such file or directory",
                                                               "/data/x.csv"))
    assert (line, code) == ("job: /data/x.csv: No such file or directory", cli.EXIT_INPUT)


def test_every_listed_input_error_is_an_exception_class():
    import importlib

    for module, names in cli.PROJECT_INPUT_ERRORS.items():
        loaded = importlib.import_module(module)
        for name in names:
            assert issubclass(getattr(loaded, name), Exception), (module, name)
    assert cli.is_input_error(importlib.import_module("ray_app.evaluation.calibration").CalibrationError())
    assert not cli.is_input_error(RuntimeError())


def test_debug_flag_is_taken_out_and_help_mentions_it(capsys):
    import argparse

    seen = []

    def main(argv):
        seen.append(argv)
        argparse.ArgumentParser().parse_args(argv)

    with pytest.raises(SystemExit) as stop:
        cli.run_job(main, ["--help", "--debug"], name="job")
    assert stop.value.code == 0 and seen == [["--help"]]
    assert "--debug" in capsys.readouterr().out
