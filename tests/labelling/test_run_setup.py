"""A labelling run's setup (ray_app/labelling/run_setup.py): built once, its identity checked
against an output folder's manifest before any work starts."""

from __future__ import annotations

import json

import pytest

from ray_app.engines import EngineConfig
from ray_app.labelling.conditions import ConditionError, load_conditions
from ray_app.labelling.prompts import (
    DEFAULT_TEMPLATE,
    DEFINITIONS_FIRST_TEMPLATE,
    REPORT_FIRST_TEMPLATE,
    bind_conditions,
)
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
                           engine=EngineConfig(model="m"), prompt="paper")
    first = RunSetup.build(method="direct", conditions=["fracture"],
                           engine=EngineConfig(model="m"), prompt="report_first")
    assert first.template is REPORT_FIRST_TEMPLATE
    assert paper.prompt_hash != first.prompt_hash
    assert _setup(adapter="/adapters/a").identity()["model"] == "some-model+/adapters/a"


def _wording(conditions, prompt=None):
    return RunSetup.build(method="direct", conditions=conditions, engine=EngineConfig(model="m"),
                          prompt=prompt).template


def test_a_run_naming_no_prompt_takes_the_wording_its_conditions_ask_for(tmp_path, caplog):
    chest = ["cardiomegaly", "pleural_effusion", "atelectasis", "fracture", "pneumothorax"]
    # measured better on Open-i (README); bound to the run's definitions
    assert _wording(chest) == bind_conditions(DEFINITIONS_FIRST_TEMPLATE, load_conditions(chest))
    assert _wording(["spinal_cancer", "disc_herniation"]) is DEFAULT_TEMPLATE
    assert _wording(chest, prompt="paper") is DEFAULT_TEMPLATE  # --prompt wins
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: mine\ndefinition: Mine is a finding.\nprompt: report_first\n")
    assert _wording(["spinal_cancer", str(mine)]) is DEFAULT_TEMPLATE  # asked for different ones
    assert "different prompt wordings" in caplog.text and "mine: report_first" in caplog.text


def test_a_condition_asking_for_an_unknown_prompt_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndefinition: Bad is a finding.\nprompt: my_prompts.yaml\n")
    with pytest.raises(ConditionError,
                       match="built-in prompt variant .*paper, report_first, definitions_first"):
        _wording([str(bad)])


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


def test_an_adapter_trained_on_another_prompt_or_definition_is_named(tmp_path):
    """A chest adapter trained with report_first (the default before definitions_first) and
    labelled with the new default: the run says which --prompt it was trained on."""
    chest = ["cardiomegaly", "fracture"]
    conditions = load_conditions(chest)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    provenance = {"prompt_hash": REPORT_FIRST_TEMPLATE.template_hash("direct"),
                  "definition_hashes": {c.name: c.definition_hash() for c in conditions}}
    (adapter / "training_provenance.json").write_text(json.dumps(provenance))

    def setup(**kwargs):
        return RunSetup.build(method="direct", conditions=chest,
                              engine=EngineConfig(model="m", adapter=str(adapter)), **kwargs)

    assert "pass --prompt report_first" in setup().adapter_mismatch()
    assert setup(prompt="report_first").adapter_mismatch() is None
    provenance["definition_hashes"]["fracture"] = "older"
    (adapter / "training_provenance.json").write_text(json.dumps(provenance))
    assert setup(prompt="report_first").adapter_mismatch() == (
        "the definitions of ['fracture'] changed since it was trained")
    assert _setup().adapter_mismatch() is None  # no adapter


def test_a_runs_unit_replaces_each_conditions_own_and_is_part_of_its_identity(tmp_path):
    def build(unit, conditions=("cardiomegaly", "fracture")):
        return RunSetup.build(method="direct", conditions=list(conditions), unit=unit,
                              engine=EngineConfig(model="m"))

    own, by_sentence, by_report = build(None), build("sentence"), build("report")
    assert {c.unit for c in by_sentence.conditions} == {"sentence"}
    assert {c.unit for c in by_report.conditions} == {"report"}
    assert by_sentence.identity()["conditions"] != by_report.identity()["conditions"]
    assert own.identity()["conditions"] in (by_sentence.identity()["conditions"],
                                            by_report.identity()["conditions"])
    with pytest.raises(ConditionError, match=r"'unit' must be one of \['report', 'sentence'\]"):
        build("paragraph")
    examples = tmp_path / "with_examples.yaml"
    examples.write_text("name: x\ndefinition: An x.\nfew_shot:\n  - {report: r, answer: 'no'}\n")
    with pytest.raises(ConditionError, match=r"condition x: 'unit: sentence' does not take"):
        build("sentence", [str(examples)])
