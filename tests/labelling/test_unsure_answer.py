"""A third, unsure answer ('maybe') that a wording offers besides yes and no: its probability
counts against yes (ray_app/labelling/prompts.py: unsure_answer; scoring.py; both engines)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from tiny_model import scores_one_by_one

from ray_app.engines import EngineConfig, make_engine
from ray_app.labelling import prompts
from ray_app.labelling.conditions import load_conditions, with_unit
from ray_app.labelling.labeller import Labeller, ReportTask
from ray_app.labelling.prompts import (
    DEFINITIONS_FIRST_MAYBE_TEMPLATE,
    DEFINITIONS_FIRST_TEMPLATE,
    REPORT_FIRST_TEMPLATE,
    PromptError,
    bind_conditions,
    load_prompt,
    template_from_dict,
)

CHEST = load_conditions(["atelectasis", "cardiomegaly", "fracture", "pleural_effusion"])
REPORTS = [
    "FINDINGS: Possible small left pleural effusion. Heart size is mildly enlarged.",
    "FINDINGS: Old healed fracture of the left 7th rib. Lungs clear.",
    "IMPRESSION: Normal chest.",
]
# The tiny test tokenizer spells " fracture" as one token (and "maybe" as five): the unsure
# answer of the engine tests below.
TINY_UNSURE = "fracture"


def _unsure(template: prompts.PromptTemplate, word: str = TINY_UNSURE) -> prompts.PromptTemplate:
    return replace(template, system=template.system.replace(
        "Tell the truth", f"Say '{word}' when unsure. Tell the truth"), unsure_answer=word,
        name=template.name + "_unsure")


def test_the_built_in_variant_offers_maybe_and_its_scored_turn_says_so():
    template = load_prompt("definitions_first_maybe")
    assert template is DEFINITIONS_FIRST_MAYBE_TEMPLATE and template.unsure_answer == "maybe"
    assert "'maybe' if the report raises it only as a possibility" in template.system
    bound = bind_conditions(template, CHEST)
    conversation = prompts.direct_conversation(bound, CHEST[0], REPORTS[0])
    assert conversation[-1] == {"role": "user", "content": conversation[-1]["content"],
                                "unsure": "maybe"}
    assert "unsure" not in prompts.direct_conversation(
        bind_conditions(DEFINITIONS_FIRST_TEMPLATE, CHEST), CHEST[0], REPORTS[0])[-1]
    summary = prompts.summary_question_conversation(bound, CHEST[0], REPORTS[0], "A summary.")
    assert summary[-1]["unsure"] == "maybe" and "unsure" not in summary[1]
    # Another wording, another hash; the yes/no wordings keep the hashes they always had.
    assert template.template_hash("direct") != DEFINITIONS_FIRST_TEMPLATE.template_hash("direct")
    assert DEFINITIONS_FIRST_TEMPLATE.template_hash("direct") == "d6dc0d4a42bb9445"


def test_a_prompt_file_must_offer_its_unsure_answer_as_one_word():
    base = {"system": "Answer yes, no or maybe. Report: {report}"}
    assert template_from_dict({**base, "unsure_answer": "maybe"}, "f").unsure_answer == "maybe"
    with pytest.raises(PromptError, match="'perhaps' is not offered by the wording"):
        template_from_dict({**base, "unsure_answer": "perhaps"}, "f")
    with pytest.raises(PromptError, match="must be one word"):
        template_from_dict({**base, "unsure_answer": "not sure"}, "f")


@pytest.mark.parametrize("template", [DEFINITIONS_FIRST_TEMPLATE, REPORT_FIRST_TEMPLATE])
@pytest.mark.parametrize("unit", ["report", "sentence"])
def test_unsure_mass_lowers_every_score_on_every_engine_path(tiny_model_dir, template, unit):
    """Packed rows (definitions-first), copies of a prefix's cache (report-first's long
    questions), sentence by sentence: each score is p(yes) / (p(yes) + p(no) + p(unsure)) of
    the prompt run alone, and below the yes/no score of the same prompt."""
    engine = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir), batch_size=4))
    conditions = [with_unit(c, unit) for c in CHEST]
    tasks = [ReportTask(f"r{i}", text) for i, text in enumerate(REPORTS)]
    unsure = Labeller(engine, conditions, "direct", _unsure(template)).label(tasks)
    plain = Labeller(engine, conditions, "direct", template).label(tasks)
    asked = Labeller(engine, conditions, "direct", _unsure(template))
    conversations = asked.engine_prompts(tasks)
    assert all(c[-1]["unsure"] == TINY_UNSURE for c in conversations)
    expected = scores_one_by_one(engine, conversations)
    assert max(abs(a - b) for a, b in zip(engine.score(conversations), expected)) < 1e-5
    if unit == "report":
        assert [r["score"] for r in unsure] == pytest.approx(expected, abs=1e-5)
    assert all(u["score"] < p["score"] for u, p in zip(unsure, plain))


def test_one_call_mixing_wordings_scores_each_with_its_own_answers(tiny_engine):
    conditions = [with_unit(c, "report") for c in CHEST]
    plain = bind_conditions(DEFINITIONS_FIRST_TEMPLATE, conditions)
    unsure = bind_conditions(_unsure(DEFINITIONS_FIRST_TEMPLATE), conditions)
    conversations = [prompts.direct_conversation(t, c, r)
                     for r in REPORTS for c in conditions for t in (plain, unsure)]
    got = tiny_engine.score(conversations)
    expected = scores_one_by_one(tiny_engine, conversations)
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5
    assert all(got[k + 1] < got[k] for k in range(0, len(got), 2))


def test_summary_follow_ups_are_scored_with_their_unsure_answer(tiny_model_dir):
    """The transformers engine scores summary follow-ups on its generation's cache: they too
    count the unsure answer, as a fresh encoding would."""
    engine = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir), batch_size=2,
                                      max_new_tokens=8))
    template = _unsure(prompts.DEFAULT_TEMPLATE)
    condition = CHEST[3]
    requests = [prompts.summary_request_conversation(template, condition, r) for r in REPORTS]

    def follow_ups(index, summary):
        return [prompts.summary_question_conversation(template, condition, REPORTS[index],
                                                      summary)]

    generations, scores = engine.generate_then_score(requests, follow_ups)
    fresh = [c for i, g in enumerate(generations) for c in follow_ups(i, g.text)]
    expected = scores_one_by_one(engine, fresh)
    assert [s for group in scores for s in group] == pytest.approx(expected, abs=1e-5)
