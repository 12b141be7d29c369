"""The built-in `definitions_first` prompt variant: the run's definitions before the report, one
short question per condition after it (ray_app/labelling/prompts.py), and the transformers
engine running that preamble once per run (ray_app/engines/transformers_engine.py)."""

from __future__ import annotations

import os
import re
from dataclasses import replace

import pytest
from tiny_model import scores_one_by_one

from ray_app.engines import EngineConfig, make_engine
from ray_app.evaluation.calibration import Calibration, CalibrationError
from ray_app.labelling import prompts
from ray_app.labelling.conditions import Condition, load_conditions, with_unit
from ray_app.labelling.labeller import Labeller, ReportTask
from ray_app.labelling.prompts import (
    DEFINITIONS_FIRST_TEMPLATE,
    REPORT_FIRST_TEMPLATE,
    PromptError,
    bind_conditions,
    load_prompt,
)
from ray_app.labelling.run_setup import RunSetup

CHEST = ["atelectasis", "cardiomegaly", "fracture", "pleural_effusion"]
REPORTS = [
    "FINDINGS: Small left pleural effusion. Heart size is mildly enlarged. No pneumothorax.\n"
    "IMPRESSION: Small effusion, cardiomegaly.",
    "FINDINGS: Old healed fracture of the left 7th rib. Lungs clear.\n"
    "IMPRESSION: No acute abnormality.",
    "IMPRESSION: Normal chest.",
    "FINDINGS: Bibasilar subsegmental atelectasis. Blunted right costophrenic angle.",
]
LEVELLED = Condition(name="rib_fracture", definition="A rib fracture is a break in a rib.",
                     levels=("left", "right"))


def whole_reports(names: list[str]) -> list[Condition]:
    """The built-in conditions asked about whole reports (the chest ones ask sentence by
    sentence): these tests are about the questions of one report."""
    return [with_unit(c, "report") for c in load_conditions(names)]


def _labeller(engine, template=DEFINITIONS_FIRST_TEMPLATE, conditions=None):
    return Labeller(engine, conditions or [*whole_reports(CHEST), LEVELLED], "direct", template)


def test_every_definition_of_the_run_comes_before_the_report_in_name_order():
    conditions = load_conditions(list(reversed(CHEST)))
    bound = bind_conditions(DEFINITIONS_FIRST_TEMPLATE, conditions)
    assert bind_conditions(bound, conditions) is bound, "binding twice changes nothing"
    assert load_prompt("definitions_first") is DEFINITIONS_FIRST_TEMPLATE
    report = REPORTS[0]
    conversations = [prompts.direct_conversation(bound, c, report) for c in conditions]
    (system,) = {c[0]["content"] for c in conversations}
    assert system.endswith(f"Report: {report}")
    # Every definition, sorted by condition name, whatever order the run named them in.
    places = [system.index(c.definition) for c in sorted(conditions, key=lambda c: c.name)]
    assert places == sorted(places) and max(places) < system.index("Report:")
    for condition, conversation in zip(conditions, conversations):
        question = conversation[-1]["content"]
        assert condition.definition not in question
        assert f"does the patient have {condition.prompt_name}?" in question
    # The preamble: everything before the report's line, the same for every report.
    chars = conversations[0][0]["preamble"]
    assert system[:chars].endswith("'no' for no.\n") and report not in system[:chars]
    other = prompts.direct_conversation(bound, conditions[0], REPORTS[1])[0]
    assert other["content"][:chars] == system[:chars]
    # The paper's wording names the condition before the report: no preamble.
    paper = prompts.direct_conversation(prompts.DEFAULT_TEMPLATE, conditions[0], report)
    assert "preamble" not in paper[0]


def test_a_reports_questions_differ_only_in_the_condition_name(tiny_engine):
    """Everything a question says that is the same for every condition, the answer format
    included, comes before the condition's name: the engine runs it once per report, and each
    further condition adds only its name and the end of the turn."""
    conditions = load_conditions(CHEST)
    bound = bind_conditions(DEFINITIONS_FIRST_TEMPLATE, conditions)
    texts = [tiny_engine.formatter.render(prompts.direct_conversation(bound, c, REPORTS[0]))
             for c in conditions]
    shared = os.path.commonprefix(texts)
    assert shared.endswith("Based on the report, does the patient have ")
    assert "'yes' for yes, 'no' for no." in shared
    rests = {text[len(shared):].removeprefix(f"{c.prompt_name}?")
             for text, c in zip(texts, conditions)}
    (turn_end,) = rests
    assert re.fullmatch(r"(<\|im_(end|start)\|>|assistant|\s)*", turn_end)


def test_an_unbound_template_is_refused_and_braces_in_definitions_survive():
    condition = Condition(name="odd", definition="Odd is {weird} and {{braced}}.")
    with pytest.raises(PromptError, match="bind it to the run's conditions"):
        prompts.direct_conversation(DEFINITIONS_FIRST_TEMPLATE, condition, "Normal.")
    bound = bind_conditions(DEFINITIONS_FIRST_TEMPLATE, [condition])
    system = prompts.direct_conversation(bound, condition, "Normal.")[0]["content"]
    assert "Odd is {weird} and {{braced}}." in system


def test_the_prompt_hash_covers_the_other_conditions_definitions(tmp_path):
    chest = load_conditions(CHEST)
    changed = [replace(chest[0], definition="Changed."), *chest[1:]]
    hashes = {bind_conditions(DEFINITIONS_FIRST_TEMPLATE, cs).template_hash("direct")
              for cs in (chest, chest[:1], changed)}
    assert len(hashes) == 3
    same_set_other_order = bind_conditions(DEFINITIONS_FIRST_TEMPLATE, chest[::-1])
    assert same_set_other_order.template_hash("direct") in hashes
    # The run's setup and its labeller's rows carry the same (bound) hash.
    setup = RunSetup.build(method="direct", conditions=CHEST, prompt="definitions_first",
                           engine=EngineConfig(engine="dry-run"))
    rows = setup.labeller().label([ReportTask("r0", REPORTS[0])])
    assert {r["prompt_hash"] for r in rows} == {setup.prompt_hash}
    assert setup.prompt_hash == bind_conditions(DEFINITIONS_FIRST_TEMPLATE, chest).template_hash(
        "direct")
    # A calibration made on a run with fewer conditions does not apply to this one.
    fewer = RunSetup.build(method="direct", conditions=CHEST[:2], prompt="definitions_first",
                           engine=EngineConfig(engine="dry-run"))
    calibration = Calibration(model=setup.model, method="direct", prompt_hash=fewer.prompt_hash,
                              definition_hashes={c.name: c.definition_hash() for c in chest},
                              entries=())
    with pytest.raises(CalibrationError, match="prompt hash"):
        replace(setup, calibration=calibration).check_calibration()


class _Recorder:
    """Wraps an engine: keeps what the labeller asks, scores with the engine."""

    def __init__(self, engine):
        self.engine, self.conversations = engine, []
        self.name, self.model_id, self.config = engine.name, engine.model_id, engine.config

    def count_tokens(self, conversation):
        return self.engine.count_tokens(conversation)

    def fits(self, conversation, tokens):
        return self.engine.fits(conversation, tokens)

    def score(self, conversations):
        self.conversations.extend(conversations)
        return self.engine.score(conversations)


@pytest.mark.parametrize("template", [DEFINITIONS_FIRST_TEMPLATE, REPORT_FIRST_TEMPLATE])
@pytest.mark.parametrize("batch_size", [3, 8])
def test_preamble_runs_once_per_run_and_scores_equal_each_prompt_alone(tiny_model_dir, template,
                                                                       batch_size):
    engine = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir),
                                      batch_size=batch_size))
    passes = []
    forward = engine._forward
    engine._forward = lambda ids, *a, **kw: (passes.append(ids.tolist()), forward(ids, *a, **kw))[1]
    recorder = _Recorder(engine)
    labeller = _labeller(recorder, template)
    tasks = [ReportTask(f"r{i}", text) for i, text in enumerate(REPORTS)]
    first = labeller.label(tasks[:2])
    second = labeller.label(tasks[2:])
    (preamble,) = engine._preambles  # one preamble, computed in the first call and kept
    assert len(preamble) >= engine.config.min_shared_prefix
    assert passes.count([list(preamble)]) == 1
    # No other pass runs the preamble's tokens again: no row of one holds its first tokens.
    head = list(preamble[: engine.config.min_shared_prefix])
    rows = [row for ids in passes if ids != [list(preamble)] for row in ids]
    assert rows and not any(_holds(row, head) for row in rows)
    if template is DEFINITIONS_FIRST_TEMPLATE:
        # A report's questions (a few tokens each) are packed into one row, batch_size reports
        # a pass: one pass per call here, whatever the number of conditions (on a GPU the time
        # follows the passes).
        calls = [len(tasks[:2]), len(tasks[2:])]
        assert len(passes) - 1 == sum(-(-n // batch_size) for n in calls)
    got = [r["score"] for r in first + second]
    expected = scores_one_by_one(engine, recorder.conversations)
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5
    # The tiny random model's scores vary little with the short questions, but 100 times more
    # than the tolerance: a pass that lost the report or the preamble would show.
    assert max(got) - min(got) > 1e-3, "scores too alike to tell questions apart"


def _holds(row: list[int], part: list[int]) -> bool:
    return any(row[k : k + len(part)] == part for k in range(len(row) - len(part) + 1))


def test_one_question_per_report_and_mixed_preambles_score_right(tiny_model_dir):
    """k = 1 (no two questions share a report: each runs on the preamble alone) and one call
    holding two runs' preambles (two condition sets, as a Serve replica may be asked)."""
    engine = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir), batch_size=4))
    conditions = load_conditions(CHEST)
    one = bind_conditions(DEFINITIONS_FIRST_TEMPLATE, conditions[:1])
    two = bind_conditions(DEFINITIONS_FIRST_TEMPLATE, conditions[1:3])
    conversations = [prompts.direct_conversation(one, conditions[0], r) for r in REPORTS]
    conversations += [prompts.direct_conversation(two, c, r) for r in REPORTS[:2]
                      for c in conditions[1:3]]
    got = engine.score(conversations)
    assert len(engine._preambles) == 2
    expected = scores_one_by_one(engine, conversations)
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5
