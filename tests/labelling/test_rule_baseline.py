"""The rule-based baseline (ray_app/labelling/rule_baseline.py)."""

from __future__ import annotations

import pytest

from ray_app.labelling.conditions import Condition, load_conditions
from ray_app.labelling.labeller import LABEL_COLUMNS, ReportTask
from ray_app.labelling.rule_baseline import RuleLabeller, mention_score


@pytest.fixture(scope="module")
def rules() -> RuleLabeller:
    return RuleLabeller(load_conditions(["pneumothorax", "pleural_effusion", "fracture",
                                         "spinal_canal_stenosis"]))


def scores(rules: RuleLabeller, text: str, condition: str) -> dict:
    rows = rules.label([ReportTask("r", text, (condition,))])
    return {r["level"]: r["score"] for r in rows}


@pytest.mark.parametrize("text, expected", [
    ("FINDINGS: Small right apical pneumothorax.", 1.0),
    ("FINDINGS: No pneumothorax.", 0.0),
    ("IMPRESSION: No evidence of pneumothorax or effusion.", 0.0),
    ("IMPRESSION: Cannot exclude a tiny pneumothorax.", 0.5),
    ("FINDINGS: Pneumothorax is not excluded.", 0.5),
    ("FINDINGS: Possible small pneumothorax.", 0.5),
    ("FINDINGS: The left pneumothorax has resolved.", 0.0),
    ("FINDINGS: Clear lungs. Normal heart size.", 0.0),
    ("FINDINGS: No effusion. Large left PNEUMOTHORAX with mediastinal shift.", 1.0),
])
def test_negation_and_hedging(rules, text, expected):
    assert scores(rules, text, "pneumothorax")[None] == expected


def test_a_firm_mention_wins_over_a_negated_one(rules):
    text = "FINDINGS: No pneumothorax on the left. Small right pneumothorax."
    assert scores(rules, text, "pneumothorax")[None] == 1.0


def test_dropped_history_is_not_read(rules):
    text = "CLINICAL HISTORY: Fall. ?rib fracture.\nFINDINGS: Normal ribs and spine."
    assert scores(rules, text, "fracture")[None] == 0.0
    assert scores(rules, "FINDINGS: Healed left rib fractures.", "fracture")[None] == 1.0


def test_levels_count_only_sentences_naming_them(rules):
    text = "FINDINGS: Moderate central canal stenosis at L4-5. L5/S1 is normal. No stenosis at L3-L4."
    got = scores(rules, text, "spinal_canal_stenosis")
    assert got == {None: 1.0, "L1-L2": 0.0, "L2-L3": 0.0, "L3-L4": 0.0, "L4-L5": 1.0,
                   "L5-S1": 0.0}


def test_rows_have_the_label_job_columns(rules):
    rows = rules.label([ReportTask("r1", "No effusion."), ReportTask("r2", "Effusion.")])
    assert all(set(r) == set(LABEL_COLUMNS) for r in rows)
    assert {r["method"] for r in rows} == {"rules"}
    assert {r["model"] for r in rows} == {rules.model_id} and rules.model_id.startswith("rules:")
    assert len({r["prompt_hash"] for r in rows}) == 1


def test_synonyms_change_the_rules_hash():
    base = load_conditions(["pneumothorax"])[0]
    more = Condition(**{**base.__dict__, "synonyms": (*base.synonyms, "ptx")})
    assert RuleLabeller([base]).prompt_hash != RuleLabeller([more]).prompt_hash
    assert base.definition_hash() == more.definition_hash()  # the LLM sees no synonyms


def test_condition_without_synonyms_is_refused():
    bare = Condition(name="thing", definition="A thing.")
    with pytest.raises(ValueError, match=r"\['thing'\] have no 'synonyms'"):
        RuleLabeller([bare])


def test_mention_score_on_a_doc_without_mentions(rules):
    assert mention_score(rules.nlp("Nothing to see."), "pneumothorax", None) == 0.0
