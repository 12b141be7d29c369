"""Condition specs: built-ins, user YAML files, validation (ray_app/labelling/conditions.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ray_app.labelling.conditions import (
    Condition,
    ConditionError,
    FewShotExample,
    builtin_condition_names,
    load_condition,
    load_conditions,
)

REQUIRED = [
    "spinal_cancer", "spinal_canal_stenosis", "cauda_equina_compression", "disc_herniation",
    "cardiomegaly", "pleural_effusion", "pneumothorax", "atelectasis", "fracture",
]

VALID_YAML = """\
name: foraminal_stenosis
display_name: neural foraminal stenosis
definition: >-
  Foraminal stenosis is narrowing of a neural foramen
  of any grade.
levels: [L4-L5, L5-S1]
drop_sections: [history, comparison]
few_shot:
  - report: "Severe left L5-S1 foraminal narrowing."
    answer: "Yes"
  - report: "Foramina patent."
    answer: "no"
"""
DEFINITION = (
    "definition: >-\n  Foraminal stenosis is narrowing of a neural foramen\n  of any grade.\n"
)


def variant(old: str, new: str) -> str:
    assert old in VALID_YAML, old
    return VALID_YAML.replace(old, new, 1)


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- built-ins ----------------------------------------------------------------------------------


def test_required_builtins_exist():
    assert set(REQUIRED) <= set(builtin_condition_names())


@pytest.mark.parametrize("name", builtin_condition_names())
def test_every_builtin_loads(name):
    condition = load_condition(name)
    assert condition.name == name  # the file name and the spec's name agree
    assert len(condition.definition.split()) >= 8
    assert "\n" not in condition.definition  # folded YAML, one sentence
    assert condition.prompt_name and "_" not in condition.prompt_name


def test_spinal_cancer_drops_history():
    assert load_condition("spinal_cancer").drop_sections == ("history",)


def test_stenosis_levels():
    condition = load_condition("spinal_canal_stenosis")
    assert condition.levels == ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
    assert condition.prompt_name == "spinal canal stenosis"


@pytest.mark.parametrize("name", ["cauda_equina_compression", "disc_herniation"])
def test_spine_conditions_without_drops_or_levels(name):
    condition = load_condition(name)
    assert condition.drop_sections == () and condition.levels == ()


# --- user files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_user_yaml_by_path(tmp_path, suffix):
    path = write(tmp_path, VALID_YAML, "foraminal" + suffix)
    for spec in (path, str(path)):
        assert load_condition(spec) == Condition(
            name="foraminal_stenosis",
            definition="Foraminal stenosis is narrowing of a neural foramen of any grade.",
            display_name="neural foraminal stenosis",
            levels=("L4-L5", "L5-S1"),
            drop_sections=("history", "comparison"),
            few_shot=(
                FewShotExample("Severe left L5-S1 foraminal narrowing.", "yes"),
                FewShotExample("Foramina patent.", "no"),
            ),
        )


def test_minimal_user_yaml_defaults(tmp_path):
    condition = load_condition(write(tmp_path, "name: scoliosis\ndefinition: Curved spine.\n"))
    assert (condition.levels, condition.drop_sections, condition.few_shot) == ((), (), ())
    assert condition.prompt_name == "scoliosis"


def test_load_conditions_mixes_builtins_and_files(tmp_path):
    path = write(tmp_path, VALID_YAML)
    names = [c.name for c in load_conditions(["fracture", str(path)])]
    assert names == ["fracture", "foraminal_stenosis"]


# --- validation errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        (variant(DEFINITION, ""), r"'definition' must be a non-empty string"),
        (variant(DEFINITION, "definition: '   '\n"), r"'definition' must be a non-empty string"),
        (variant("name: foraminal_stenosis\n", ""), r"'name' must be a non-empty string"),
        (variant("name: foraminal_stenosis", "name: [a, b]"), r"'name' must be a non-empty"),
        (variant("definition:", "defintion:"), r"unknown field\(s\) \['defintion'\]"),
        (variant("levels: [L4-L5, L5-S1]", "levels: L4-L5"), r"'levels' must be a list of"),
        (variant("levels: [L4-L5, L5-S1]", "levels: [4, 5]"), r"'levels' must be a list of"),
        (variant("levels: [L4-L5, L5-S1]", "levels: [L4-L5, '']"), r"'levels' must be a list"),
        (variant("levels: [L4-L5, L5-S1]", "levels: [L4-L5, L4-L5]"), r"'levels' has duplicates"),
        (variant("[history, comparison]", "[histroy]"),
         r"drop_sections \['histroy'\] are not section kinds; use some of \['preamble', 'history'"),
        (variant("[history, comparison]", "history"), r"'drop_sections' must be a list"),
        (variant('answer: "Yes"', "answer: maybe"), r"few_shot\[0\]\.answer must be 'yes' or"),
        (variant('    answer: "no"\n', ""), r"few_shot\[1\] must have exactly 'report' and"),
        (variant('    answer: "no"\n', '    answer: "no"\n    note: x\n'),
         r"few_shot\[1\] must have exactly 'report' and 'answer'"),
        (VALID_YAML.split("few_shot:")[0] + "few_shot: {report: r, answer: 'yes'}\n",
         r"'few_shot' must be a list"),
        (variant("name: foraminal_stenosis", "name: [unclosed"), r"not valid YAML"),
        (variant("levels:", "unit: paragraph\nlevels:"), r"'unit' must be one of \['report', "
         r"'sentence'\], got 'paragraph'"),
        (variant("levels:", "unit: sentence\nlevels:"),
         r"'unit: sentence' does not take few_shot examples"),
    ],
    ids=["missing-definition", "blank-definition", "missing-name", "name-not-text",
         "unknown-key", "levels-not-list", "levels-not-strings", "level-empty", "levels-dup",
         "bad-drop-kind", "drops-not-list", "bad-answer", "few-shot-missing-answer",
         "few-shot-extra-key", "few-shot-not-list", "invalid-yaml", "unknown-unit",
         "sentence-unit-with-examples"],
)
def test_invalid_user_yaml_names_file_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConditionError, match=message) as info:
        load_condition(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("written, answer", [("yes", "yes"), ("no", "no"), ("No", "no")])
def test_unquoted_yes_no_few_shot_answer(tmp_path, written, answer):
    path = write(tmp_path, variant('answer: "Yes"', f"answer: {written}"))
    assert load_condition(path).few_shot[0].answer == answer


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConditionError, match=r"expected a mapping of fields") as info:
        load_condition(path)
    assert str(path) in str(info.value)


def test_missing_yaml_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConditionError, match=r"condition file .*nope\.yaml does not exist"):
        load_condition(path)


def test_unknown_builtin_lists_the_builtins():
    with pytest.raises(ConditionError, match=r"unknown condition 'spinal_cancr'") as info:
        load_condition("spinal_cancr")
    assert "spinal_cancer" in str(info.value) and "path of your own YAML" in str(info.value)


def test_load_conditions_refuses_duplicate_names(tmp_path):
    path = write(tmp_path, "name: pneumothorax\ndefinition: My own wording.\n")
    with pytest.raises(ConditionError, match=r"named twice: \['pneumothorax', 'pneumothorax'\]"):
        load_conditions(["pneumothorax", str(path)])
    with pytest.raises(ConditionError, match=r"named twice"):
        load_conditions(["fracture", "fracture"])


# --- definition_hash ----------------------------------------------------------------------------


def test_definition_hash_is_stable_across_loads_and_layouts(tmp_path):
    hashed = load_condition(write(tmp_path, VALID_YAML)).definition_hash()
    assert hashed == load_condition(write(tmp_path, VALID_YAML, "again.yaml")).definition_hash()
    relaid = (
        "few_shot: [{answer: 'yes', report: Severe left L5-S1 foraminal narrowing.},\n"
        "           {answer: ' NO', report: Foramina patent.}]\n"
        "drop_sections: [comparison, history]\n"
        "levels: [L4-L5, L5-S1]\n"
        "definition: '  Foraminal stenosis is narrowing of a neural foramen of any grade.  '\n"
        "display_name: neural foraminal stenosis\nname: foraminal_stenosis\n"
    )
    assert load_condition(write(tmp_path, relaid, "relaid.yaml")).definition_hash() == hashed
    assert len(hashed) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"definition": "Foraminal stenosis is narrowing of a neural foramen of high grade."},
        {"display_name": "foraminal stenosis"},
        {"levels": ("L4-L5",)},
        {"levels": ("L5-S1", "L4-L5")},
        {"drop_sections": ("history",)},
        {"few_shot": ()},
        {"few_shot": (FewShotExample("Severe left L5-S1 foraminal narrowing.", "no"),
                      FewShotExample("Foramina patent.", "no"))},
        {"unit": "sentence"},
    ],
    ids=["definition", "display-name", "fewer-levels", "level-order", "drops", "no-few-shot",
         "few-shot-answer", "unit"],
)
def test_definition_hash_changes_with_what_the_model_is_asked(tmp_path, change):
    condition = load_condition(write(tmp_path, VALID_YAML))
    assert dataclasses.replace(condition, **change).definition_hash() != condition.definition_hash()


def test_a_report_unit_keeps_the_hash_conditions_had_before_units(tmp_path):
    """Calibrations and label runs made before `unit` existed still match their conditions."""
    without = load_condition(write(tmp_path, VALID_YAML))
    written = load_condition(write(tmp_path, variant("levels:", "unit: report\nlevels:"), "u.yaml"))
    assert without.unit == written.unit == "report"
    assert written.definition_hash() == without.definition_hash() == "34412dea22a8c8e7"


def test_definition_hash_ignores_name_when_prompt_wording_is_the_same(tmp_path):
    condition = load_condition(write(tmp_path, VALID_YAML))
    renamed = dataclasses.replace(condition, name="foraminal_stenosis_v2")
    assert renamed.definition_hash() == condition.definition_hash()
    # Without a display name the name is the prompt wording, so then it counts.
    bare = dataclasses.replace(condition, display_name="")
    assert dataclasses.replace(bare, name="other").definition_hash() != bare.definition_hash()


def test_the_builtin_fracture_question_names_its_scope_and_the_former_file_keeps_the_old_one():
    builtin, = load_conditions(["fracture"])
    former, = load_conditions([str(Path(__file__).resolve().parents[2] / "configs"
                                   / "fracture_2026-12-04.yaml")])
    assert builtin.prompt_name == "any fracture, old or healed"
    # the earlier rows of the README are reproduced with the former name and the same definition
    assert (former.name, former.prompt_name) == ("fracture", "fracture")
    assert former.definition == builtin.definition
    assert former.definition_hash() != builtin.definition_hash()
