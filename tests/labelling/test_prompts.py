"""Prompt wording and conversations (ray_app/labelling/prompts.py), rendered through a real chat template."""

from __future__ import annotations

import dataclasses

import pytest

from ray_app.labelling.conditions import Condition, FewShotExample
from ray_app.labelling.prompts import (
    DEFAULT_TEMPLATE,
    PromptTemplate,
    direct_conversation,
    question_levels,
    summary_question_conversation,
    summary_request_conversation,
)

STENOSIS = Condition(
    name="spinal_canal_stenosis",
    definition="Spinal canal stenosis is narrowing of the central spinal canal.",
    levels=("L4-L5", "L5-S1"),
)
REPORT = "FINDINGS: Moderate central canal stenosis at L4-L5.\nIMPRESSION: Stenosis."
# The MICCAI 2024 paper's prompt, word for word.
SYSTEM = (
    "You are a radiologist. Your job is to diagnose spinal canal stenosis using a medical report. "
    "Tell the truth and answer as precisely as possible.\n"
    "Report: FINDINGS: Moderate central canal stenosis at L4-L5.\nIMPRESSION: Stenosis."
)
DIRECT_QUESTION = (
    "Spinal canal stenosis is narrowing of the central spinal canal. Based on the report, does "
    "the patient have spinal canal stenosis? Answer 'yes' for yes, 'no' for no."
)
SUMMARY_REQUEST = (
    "Can you write a summary for the report with the goal of diagnosing spinal canal stenosis?"
)


def test_direct_query_paper_wording():
    assert direct_conversation(DEFAULT_TEMPLATE, STENOSIS, REPORT) == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": DIRECT_QUESTION},
    ]


@pytest.mark.parametrize("level", ["L4-L5", "L5-S1"])
def test_direct_query_level_suffix(level):
    conversation = direct_conversation(DEFAULT_TEMPLATE, STENOSIS, REPORT, level=level)
    assert conversation[-1]["content"] == DIRECT_QUESTION.replace(
        "have spinal canal stenosis?", f"have spinal canal stenosis at {level}?"
    )
    assert conversation[0]["content"] == SYSTEM  # the level is asked, not put in the system


def test_summary_request_paper_wording():
    assert summary_request_conversation(DEFAULT_TEMPLATE, STENOSIS, REPORT) == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": SUMMARY_REQUEST},
    ]


@pytest.mark.parametrize(
    "level, asked",
    [(None, "spinal canal stenosis?"), ("L4-L5", "spinal canal stenosis at L4-L5?")],
)
def test_summary_question_paper_wording(level, asked):
    summary = "Moderate stenosis at L4-L5."
    conversation = summary_question_conversation(DEFAULT_TEMPLATE, STENOSIS, REPORT, summary, level)
    assert conversation == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": SUMMARY_REQUEST},
        {"role": "assistant", "content": summary},
        {
            "role": "user",
            "content": "Spinal canal stenosis is narrowing of the central spinal canal. Based on "
            f"your summary, does the patient have {asked}",
        },
    ]


def test_display_name_and_definition_placement():
    condition = Condition(name="ce", definition="Definition first.", display_name="cauda equina")
    system, question = direct_conversation(DEFAULT_TEMPLATE, condition, "No compression.")
    assert system["content"].startswith("You are a radiologist. Your job is to diagnose cauda "
                                        "equina using a medical report.")
    assert system["content"].endswith("\nReport: No compression.")
    assert "Definition first." not in system["content"]
    assert question["content"].startswith("Definition first. Based on the report, does the "
                                          "patient have cauda equina?")


def test_few_shot_turns_come_between_system_and_question():
    condition = dataclasses.replace(
        STENOSIS,
        few_shot=(FewShotExample("Severe stenosis L4-L5.", "yes"),
                  FewShotExample("Normal canal.", "no")),
    )
    conversation = direct_conversation(DEFAULT_TEMPLATE, condition, REPORT, level="L4-L5")
    assert [m["role"] for m in conversation] == [
        "system", "user", "assistant", "user", "assistant", "user"
    ]
    assert conversation[0]["content"] == SYSTEM
    assert conversation[1]["content"] == f"Report: Severe stenosis L4-L5.\n{DIRECT_QUESTION}"
    assert conversation[2]["content"] == "yes"
    assert conversation[3]["content"] == f"Report: Normal canal.\n{DIRECT_QUESTION}"
    assert conversation[4]["content"] == "no"
    # The report asked about comes again with the question, or it would follow an example's.
    assert conversation[5]["content"] == f"Report: {REPORT}\n" + DIRECT_QUESTION.replace(
        "stenosis?", "stenosis at L4-L5?")
    without = direct_conversation(DEFAULT_TEMPLATE, STENOSIS, REPORT, level="L4-L5")
    assert without[-1]["content"] == DIRECT_QUESTION.replace("stenosis?", "stenosis at L4-L5?")
    assert condition.definition_hash() != dataclasses.replace(
        condition, few_shot=()).definition_hash()


def test_summary_conversations_do_not_carry_few_shot():
    condition = dataclasses.replace(STENOSIS, few_shot=(FewShotExample("x", "yes"),))
    assert len(summary_request_conversation(DEFAULT_TEMPLATE, condition, REPORT)) == 2


def test_question_levels():
    assert question_levels(STENOSIS) == [None, "L4-L5", "L5-S1"]
    assert question_levels(Condition(name="fracture", definition="d")) == [None]


def test_report_with_braces_is_not_formatted():
    report = "Lesion {size} at L{n}."
    assert direct_conversation(DEFAULT_TEMPLATE, STENOSIS, report)[0]["content"].endswith(
        "Report: Lesion {size} at L{n}."
    )


# --- template_hash ------------------------------------------------------------------------------


def test_template_hash_is_stable_and_per_method():
    direct = DEFAULT_TEMPLATE.template_hash("direct")
    assert direct == PromptTemplate().template_hash("direct")  # a fresh object, same wording
    assert len(direct) == 16 and set(direct) <= set("0123456789abcdef")
    assert direct != DEFAULT_TEMPLATE.template_hash("summary")


@pytest.mark.parametrize(
    "field_name, changes_direct, changes_summary",
    [
        ("system", True, True),
        ("level_suffix", True, True),
        ("direct_question", True, False),
        ("summary_request", False, True),
        ("summary_question", False, True),
        ("name", False, False),
    ],
)
def test_template_hash_follows_the_wording_each_method_uses(
    field_name, changes_direct, changes_summary
):
    changed = dataclasses.replace(
        DEFAULT_TEMPLATE, **{field_name: getattr(DEFAULT_TEMPLATE, field_name) + " Please."}
    )
    for method, should_change in (("direct", changes_direct), ("summary", changes_summary)):
        differs = changed.template_hash(method) != DEFAULT_TEMPLATE.template_hash(method)
        assert differs == should_change, (field_name, method)


# --- a real chat template (SmolLM2, ChatML) -----------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from ray_app.engines.model_sources import resolve_model

    try:
        loc = resolve_model("smollm2-135m-instruct")
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 pip package not installed ({err})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(loc.folder, gguf_file=loc.gguf_file)


def test_direct_query_rendered_through_smollm2_chat_template(smollm2_tokenizer):
    from ray_app.engines.base import ChatFormatter

    conversation = direct_conversation(DEFAULT_TEMPLATE, STENOSIS, REPORT, level="L5-S1")
    expected = (
        "<|im_start|>system\n"
        "You are a radiologist. Your job is to diagnose spinal canal stenosis using a medical "
        "report. Tell the truth and answer as precisely as possible.\n"
        "Report: FINDINGS: Moderate central canal stenosis at L4-L5.\n"
        "IMPRESSION: Stenosis.<|im_end|>\n"
        "<|im_start|>user\n"
        "Spinal canal stenosis is narrowing of the central spinal canal. Based on the report, "
        "does the patient have spinal canal stenosis at L5-S1? Answer 'yes' for yes, 'no' for "
        "no.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ChatFormatter(smollm2_tokenizer).render(conversation) == expected
    rendered = smollm2_tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    assert rendered == expected
    # Our system message replaces the template's default one ("You are a helpful AI assistant").
    assert "SmolLM" not in rendered


def test_summary_question_rendered_keeps_summary_as_assistant_turn(smollm2_tokenizer):
    from ray_app.engines.base import ChatFormatter

    conversation = summary_question_conversation(
        DEFAULT_TEMPLATE, STENOSIS, REPORT, "Stenosis at L4-L5.", level="L4-L5"
    )
    rendered = ChatFormatter(smollm2_tokenizer).render(conversation)
    assert rendered.endswith(
        f"<|im_start|>user\n{SUMMARY_REQUEST}<|im_end|>\n"
        "<|im_start|>assistant\nStenosis at L4-L5.<|im_end|>\n"
        "<|im_start|>user\nSpinal canal stenosis is narrowing of the central spinal canal. Based "
        "on your summary, does the patient have spinal canal stenosis at L4-L5?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert rendered.count("<|im_start|>") == 5
