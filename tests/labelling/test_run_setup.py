"""A labelling run's setup (ray_app/labelling/run_setup.py): built once, its identity checked
against an output folder's manifest before any work starts."""

from __future__ import annotations

import pytest

from ray_app.engines import EngineConfig
from ray_app.labelling.prompts import REPORT_FIRST_TEMPLATE
from ray_app.labelling.run_setup import RunSetup
from ray_app.pipeline import report_tables as tables
from ray_app.pipeline.label_job import ResumeError, check_resume


def _setup(**engine) -> RunSetup:
    return RunSetup.build(method="direct", conditions=["cardiomegaly", "fracture"],
                          engine=EngineConfig(**{"model": "some-model", **engine}))


def test_identity_is_known_without_loading_a_model():
    setup = _setup()
    identity = setup.identity()
    assert identity["model"] == "some-model" and identity["method"] == "direct"
    assert identity["scoring"] == {"engine": "transformers", "dtype": "auto"}
    assert set(identity["conditions"]) == {"cardiomegaly", "fracture"}
    assert _setup(engine="dry-run").model == "dry-run:some-model"
    assert _setup(engine="my_pkg.engines:Mine").model is None  # its ids are its own


def test_prompt_and_adapter_are_part_of_the_identity():
    paper = RunSetup.build(method="direct", conditions=["fracture"],
                           engine=EngineConfig(model="m"))
    first = RunSetup.build(method="direct", conditions=["fracture"],
                           engine=EngineConfig(model="m"), prompt="report_first")
    assert first.template is REPORT_FIRST_TEMPLATE
    assert paper.prompt_hash != first.prompt_hash
    assert _setup(adapter="/adapters/a").identity()["model"] == "some-model+/adapters/a"


def test_a_run_resumed_with_another_dtype_is_refused(tmp_path):
    out = tables.locate(str(tmp_path / "out"))
    check_resume(out, _setup(dtype="float32").identity())
    check_resume(out, _setup(dtype="float32").identity())  # the same settings resume
    with pytest.raises(ResumeError, match="different engine or dtype"):
        check_resume(out, _setup(dtype="bfloat16").identity())
    with pytest.raises(ResumeError, match="different engine or dtype"):
        check_resume(out, _setup(dtype="float32", engine="vllm").identity())


def test_a_folder_from_before_engine_settings_were_recorded_still_resumes(tmp_path):
    out = tables.locate(str(tmp_path / "out"))
    old = _setup(dtype="float32").identity()
    del old["scoring"]
    tables.write_manifest(out, old)
    check_resume(out, _setup(dtype="float32").identity())
    assert tables.read_manifest(out)["scoring"]["dtype"] == "float32"  # recorded from now on
