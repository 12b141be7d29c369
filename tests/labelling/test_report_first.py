"""The built-in `report_first` prompt variant: one shared prefix per report, whatever the condition
(ray_app/labelling/prompts.py), and the transformers engine running that prefix once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tiny_model import scores_one_by_one

from ray_app.engines import EngineConfig, make_engine
from ray_app.engines.transformers_engine import (
    _common_prefix_len,
    first_messages,
    shared_prefix_groups,
)
from ray_app.labelling import prompts
from ray_app.labelling.conditions import (
    Condition,
    FewShotExample,
    load_conditions,
    with_unit,
)
from ray_app.labelling.labeller import Labeller, ReportTask
from ray_app.labelling.prompts import (
    BUILTIN_TEMPLATES,
    DEFAULT_TEMPLATE,
    REPORT_FIRST_TEMPLATE,
    PromptError,
    load_prompt,
    load_prompt_variants,
)

REPO = Path(__file__).resolve().parents[2]
CHEST = ["atelectasis", "cardiomegaly", "fracture", "pleural_effusion", "pneumothorax"]
REPORTS = [
    "FINDINGS: Small left pleural effusion. Heart size is mildly enlarged. No pneumothorax.\n"
    "IMPRESSION: Small effusion, cardiomegaly.",
    "CLINICAL HISTORY: fall.\nFINDINGS: Old healed fracture of the left 7th rib. Lungs clear.\n"
    "IMPRESSION: No acute abnormality.",
    "IMPRESSION: Normal chest.",
]
# A level-specific condition: its overall and level questions share the report's prefix too.
LEVELLED = Condition(
    name="rib_fracture",
    definition="A rib fracture is a break in a rib, acute or healed.",
    levels=("left", "right"),
    drop_sections=("history",),
)


def whole_reports(names: list[str]) -> list[Condition]:
    """The built-in conditions asked about whole reports (the chest ones ask sentence by
    sentence): these tests are about the questions of one report."""
    return [with_unit(c, "report") for c in load_conditions(names)]


def test_paper_wording_and_its_hashes_are_unchanged():
    assert BUILTIN_TEMPLATES["paper"] is DEFAULT_TEMPLATE
    # Hashes recorded in existing outputs and calibrations: a change here orphans them.
    assert DEFAULT_TEMPLATE.template_hash("direct") == "cb01c331d221abc4"
    assert DEFAULT_TEMPLATE.template_hash("summary") == "51ad935f50a67e2c"
    for method in prompts.METHODS:
        assert REPORT_FIRST_TEMPLATE.template_hash(method) != DEFAULT_TEMPLATE.template_hash(method)


def test_report_first_puts_the_report_before_any_condition():
    conditions = whole_reports(CHEST)
    report = REPORTS[0]
    conversations = [prompts.direct_conversation(REPORT_FIRST_TEMPLATE, c, report) for c in conditions]
    systems = {c[0]["content"] for c in conversations}
    assert len(systems) == 1, "the system message must not depend on the condition"
    (system,) = systems
    assert system.endswith(f"Report: {report}")
    role = system[: -len(report)]
    for condition, conversation in zip(conditions, conversations):
        assert condition.prompt_name not in role
        question = conversation[-1]["content"]
        assert question.startswith(condition.definition)
        assert f"does the patient have {condition.prompt_name}?" in question
    level = prompts.direct_conversation(REPORT_FIRST_TEMPLATE, LEVELLED, report, "left")
    assert level[0]["content"] == system and "rib fracture at left?" in level[-1]["content"]
    summary = prompts.summary_request_conversation(REPORT_FIRST_TEMPLATE, conditions[0], report)
    assert summary[0]["content"] == system


def test_few_shot_turns_come_after_the_report():
    condition = Condition(name="fracture", definition="A fracture is a break in a bone.",
                          few_shot=(FewShotExample("Acute rib fracture.", "yes"),))
    conversation = prompts.direct_conversation(REPORT_FIRST_TEMPLATE, condition, REPORTS[0])
    assert conversation[0]["content"].endswith(REPORTS[0])
    assert [m["role"] for m in conversation] == ["system", "user", "assistant", "user"]
    assert conversation[1]["content"].startswith("Report: Acute rib fracture.")


def test_builtin_variants_are_selected_by_name(tmp_path):
    assert load_prompt("report_first") is REPORT_FIRST_TEMPLATE
    assert load_prompt("paper") is DEFAULT_TEMPLATE
    assert load_prompt("report_first", "report_first") is REPORT_FIRST_TEMPLATE
    assert load_prompt_variants("report_first") == [REPORT_FIRST_TEMPLATE]
    with pytest.raises(PromptError, match="--prompt-name"):
        load_prompt("report_first", "paper")
    with pytest.raises(PromptError, match="neither a prompt file nor a built-in variant"):
        load_prompt("report-first")  # a typo is neither a file nor a built-in
    # A file still works, and may define its own variant called report_first.
    path = tmp_path / "mine.yaml"
    path.write_text("- name: report_first\n  system: 'Read this. Report: {report}'\n")
    assert load_prompt(path).system == "Read this. Report: {report}"


def test_label_job_and_serving_accept_a_builtin_name():
    from ray_app.pipeline.label_job import LabelJobConfig, run_setup
    from ray_app.serving.app import AppArgs

    cfg = LabelJobConfig(input="in.csv", output="out", conditions=["fracture"],
                         prompt="report_first")
    assert run_setup(cfg).template is REPORT_FIRST_TEMPLATE
    assert AppArgs(conditions=["fracture"], prompt="report_first").prompt == "report_first"


def _questions(template, conditions=None):
    """Questions as the labeller orders them: report by report, condition by condition, level
    by level (the history section dropped as the chest conditions ask)."""
    conditions = conditions or [*whole_reports(CHEST), LEVELLED]
    engine = _NoEngine()
    labeller = Labeller(engine, conditions, "direct", template)
    tasks = [ReportTask(f"r{i}", text) for i, text in enumerate(REPORTS)]
    labeller.label(tasks)
    return engine.conversations, len(conditions) + len(LEVELLED.levels)


class _NoEngine:
    """Records what the labeller asks; scores 0.5."""

    name = "record"
    model_id = "record"
    config = EngineConfig(max_context_tokens=10**6)

    def __init__(self):
        self.conversations = []

    def count_tokens(self, conversation):
        return sum(len(m["content"]) for m in conversation)

    def fits(self, conversation, tokens):
        return self.count_tokens(conversation) <= tokens

    def score(self, conversations):
        self.conversations.extend(conversations)
        return [0.5] * len(conversations)


def test_a_reports_questions_fall_into_one_shared_prefix_group(tiny_engine):
    config = tiny_engine.config
    conversations, per_report = _questions(REPORT_FIRST_TEMPLATE)
    encoded = [tiny_engine.formatter.token_ids(c) for c in conversations]
    groups = shared_prefix_groups(encoded, config.min_shared_prefix, first_messages(conversations))
    expected = [list(range(r * per_report, (r + 1) * per_report)) for r in range(len(REPORTS))]
    assert groups == expected
    # The paper's wording names the condition before the report: only a condition's levels share.
    conversations, _ = _questions(DEFAULT_TEMPLATE)
    encoded = [tiny_engine.formatter.token_ids(c) for c in conversations]
    paper_groups = shared_prefix_groups(encoded, config.min_shared_prefix,
                                        first_messages(conversations))
    assert max(len(g) for g in paper_groups) == 1 + len(LEVELLED.levels)
    assert len(paper_groups) == len(REPORTS) * len(CHEST) + len(REPORTS)


def test_short_report_long_definition_still_shares(tiny_engine):
    """The shared part may be under half of each prompt (short report, long definitions)."""
    filler = " ".join(["seen on the current images in any part of the chest"] * 4)
    long = [Condition(name=f"finding_{i}", definition=f"Finding {i} is {filler}.")
            for i in range(4)]
    conversations = [prompts.direct_conversation(REPORT_FIRST_TEMPLATE, c, text)
                     for text in ("Normal.", "Normal chest, no effusion.") for c in long]
    encoded = [tiny_engine.formatter.token_ids(c) for c in conversations]
    shared = _common_prefix_len(encoded[:4])
    assert 2 * shared < min(len(e) for e in encoded[:4]), "the case a half-rule refused"
    assert shared_prefix_groups(encoded, 16, first_messages(conversations)) == [
        [0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("batch_size", [3, 8])
def test_shared_prefix_scores_equal_each_prompt_alone(tiny_model_dir, batch_size):
    engine = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir),
                                      batch_size=batch_size))
    conversations, _ = _questions(REPORT_FIRST_TEMPLATE)
    ran = {"_score_packed": [], "_score_on_copies": []}
    for name, groups in ran.items():
        method = getattr(engine, name)
        setattr(engine, name, lambda g, *a, m=method, seen=groups: (seen.extend(g), m(g, *a))[1])
    got = engine.score(conversations)
    ran_shared = ran["_score_packed"] + ran["_score_on_copies"]
    assert sorted(i for g, _ in ran_shared for i in g) == list(range(len(conversations)))
    # A report's questions carry their definitions, longer together than the report: each
    # runs on a copy of the report's KV cache rather than packed into one row (`_packs`).
    assert ran["_score_on_copies"] and not ran["_score_packed"]
    expected = scores_one_by_one(engine, conversations)
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5
    assert max(got) - min(got) > 0.05, "scores too alike to tell conditions apart"


def test_select_prompt_takes_builtin_names_beside_files(tmp_path, monkeypatch):
    """jobs/select_prompt.py --prompts FILE report_first: every variant labelled with the right
    source and name; a name given twice across sources is refused before any labelling."""
    sys.path.insert(0, str(REPO / "jobs"))
    import select_prompt

    (tmp_path / "reports.csv").write_text("report_id,text\nr0,FINDINGS: Normal.\n")
    (tmp_path / "truth.csv").write_text("report_id,condition,level,label\nr0,fracture,,0\n")
    variants = tmp_path / "variants.yaml"
    variants.write_text("- name: terse\n  direct_question: 'Does the patient have {condition}?'\n")
    flags = ["--truth", str(tmp_path / "truth.csv"), "--out", str(tmp_path / "sel"),
             "--input", str(tmp_path / "reports.csv"), "--conditions", "fracture",
             "--engine", "dry-run"]
    ran = []

    class Stop(Exception):
        pass

    def fake_run(cfg):
        ran.append((cfg.prompt, cfg.prompt_name, load_prompt(cfg.prompt, cfg.prompt_name).name))
        if len(ran) == 2:
            raise Stop

    monkeypatch.setattr(select_prompt, "run_label_job", fake_run)
    monkeypatch.setattr(select_prompt, "read_label_rows", lambda output: None)
    with pytest.raises(Stop):
        select_prompt.main(["--prompts", str(variants), "report_first", *flags])
    assert ran == [(str(variants), "terse", "terse"),
                   ("report_first", "report_first", "report_first")]
    ran.clear()
    with pytest.raises(PromptError, match="unique across them"):
        select_prompt.main(["--prompts", "paper", str(REPO / "configs" / "prompt_variants.yaml"),
                            *flags])
    assert ran == []
