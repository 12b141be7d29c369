"""Prompt wording (the paper's, by default) and the conversations built from it.

Conversations are lists of chat messages; each engine renders them through the model's own
chat template, so the same wording works for any instruct model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import yaml

from ray_app.labelling.conditions import Condition, FewShotExample

log = logging.getLogger(__name__)

# role, content and, on a system message, optionally `preamble` (an int: see _system); on the
# scored user turn, optionally `unsure` (the third answer: see _asked)
Message = dict[str, Any]
Conversation = list[Message]

METHODS = ("direct", "summary")


@dataclass(frozen=True)
class PromptTemplate:
    """The wording of both prompting strategies; `{...}` fields are filled per report."""

    system: str = field(
        default=(
            "You are a radiologist. Your job is to diagnose {condition} using a medical report. "
            "Tell the truth and answer as precisely as possible.\nReport: {report}"
        ),
        metadata={"doc": "System message; holds the report, and may hold {definitions}: every "
                         "condition of the run, one per line (definitions_first)."},
    )
    direct_question: str = field(
        default=(
            "{definition} Based on the report, does the patient have {condition}{at_level}? "
            "Answer 'yes' for yes, 'no' for no."
        ),
        metadata={"doc": "Direct query: the user turn whose answer token is scored."},
    )
    summary_request: str = field(
        default="Can you write a summary for the report with the goal of diagnosing {condition}?",
        metadata={"doc": "Summary-then-query, step 1: the model writes a summary."},
    )
    summary_question: str = field(
        default="{definition} Based on your summary, does the patient have {condition}{at_level}?",
        metadata={"doc": "Summary-then-query, step 2: asked after the summary, scored."},
    )
    level_suffix: str = field(
        default=" at {level}", metadata={"doc": "Appended to the condition for a level question."}
    )
    unsure_answer: str = field(
        default="",
        metadata={"doc": "A third answer the wording offers besides 'yes' and 'no' (one word, "
                         "such as 'maybe'); its probability counts against yes. Empty: yes/no."},
    )
    name: str = field(default="paper", metadata={"doc": "Label for reports; not hashed."})

    def template_hash(self, method: str) -> str:
        """Hash of the wording used by `method`; in every output row."""
        fields = asdict(self)
        fields.pop("name")
        if not fields["unsure_answer"]:
            fields.pop("unsure_answer")  # so the hashes of yes/no wordings stay what they were
        if method == "direct":
            fields.pop("summary_request"), fields.pop("summary_question")
        else:
            fields.pop("direct_question")
        payload = json.dumps({"method": method, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


DEFAULT_TEMPLATE = PromptTemplate()

# Report first: the system message holds the role and the report and names no condition, so
# every question about one report (each condition, each level) starts with the same tokens and
# engines compute that prefix once per report (the transformers engine's shared-prefix groups,
# vLLM's prefix caching). The definition and the question follow in the user turn, as in the
# paper; few-shot turns, which differ per condition, come after the report too.
REPORT_FIRST_TEMPLATE = PromptTemplate(
    system=(
        "You are a radiologist. Read the medical report below; you will be asked about one "
        "condition at a time. Tell the truth and answer as precisely as possible.\nReport: {report}"
    ),
    name="report_first",
)

# Definitions first: the system message holds the role and the definitions of every condition
# of the run, then the report; each question names its condition only. Everything before the
# report is the same for every report of a run (engines compute it once per run: a preamble),
# and what follows the report is a short question, so k conditions cost the report once and k
# short questions. The answer format is said once, in the system message, and the question ends
# with the condition's name: the questions of a report then share everything up to that name
# (9 conditions: 1.8x the tokens of one, against 2.7x with the format after each question, for
# the same accuracy on Open-i: README). A condition's prompt depends on the other conditions of
# the run: their definitions are in the prompt hash (bind_conditions), so a calibration made
# with another set is refused. The wording before 2026-12-04 (the format after each question) is
# configs/definitions_first_2026-12-03.yaml.
DEFINITIONS_FIRST_TEMPLATE = PromptTemplate(
    system=(
        "You are a radiologist. You will read a medical report and be asked about one condition "
        "at a time, as defined here:\n{definitions}\nTell the truth and answer as precisely as "
        "possible: 'yes' for yes, 'no' for no.\nReport: {report}"
    ),
    direct_question="Based on the report, does the patient have {condition}{at_level}?",
    summary_question="Based on your summary, does the patient have {condition}{at_level}?",
    name="definitions_first",
)

# Definitions first with a third answer: the model may say 'maybe' when a report only raises
# the condition as a possibility, and that probability counts against yes (scoring.py). A hedge
# ("possible small effusions") then scores below a statement instead of being split between
# yes and no by the model's lean (README, label quality).
DEFINITIONS_FIRST_MAYBE_TEMPLATE = replace(
    DEFINITIONS_FIRST_TEMPLATE,
    system=DEFINITIONS_FIRST_TEMPLATE.system.replace(
        "'yes' for yes, 'no' for no.",
        "'yes' if the report states it, 'no' if it does not, 'maybe' if the report raises it "
        "only as a possibility."),
    unsure_answer="maybe",
    name="definitions_first_maybe",
)

# Variants selectable by name wherever a prompt file is accepted (--prompt report_first).
BUILTIN_TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t for t in (DEFAULT_TEMPLATE, REPORT_FIRST_TEMPLATE, DEFINITIONS_FIRST_TEMPLATE,
                        DEFINITIONS_FIRST_MAYBE_TEMPLATE)
}


def bind_conditions(template: PromptTemplate, conditions: Sequence[Condition]) -> PromptTemplate:
    """The template with `{definitions}` filled in: one line per condition, sorted by name, so
    that the order conditions were named in does not change a score. The filled text is part of
    the template, hence of its hash. A template without the placeholder comes back unchanged
    (binding twice is harmless)."""
    if "{definitions}" not in template.system:
        return template
    lines = "\n".join(f"- {c.prompt_name}: {c.definition}"
                      for c in sorted(conditions, key=lambda c: c.name))
    escaped = lines.replace("{", "{{").replace("}", "}}")  # the rest is formatted per report
    return replace(template, system=template.system.replace("{definitions}", escaped))


def conditions_prompt(conditions: Sequence[Condition]) -> PromptTemplate:
    """The wording a run uses when it names none: the built-in variant its conditions' YAMLs
    ask for (`prompt:`; the chest X-ray conditions ask for definitions_first, measured better
    and faster on Open-i), else the paper's. Conditions asking for different ones get the paper's,
    with a warning."""
    wanted = {c.name: c.prompt or DEFAULT_TEMPLATE.name for c in conditions}
    if len(set(wanted.values())) == 1:
        return BUILTIN_TEMPLATES[next(iter(wanted.values()))]
    log.warning("the conditions ask for different prompt wordings (%s); using the paper's: "
                "pass --prompt to choose", ", ".join(f"{n}: {w}" for n, w in wanted.items()))
    return DEFAULT_TEMPLATE


# The placeholders each field may use; anything else is a typo that would fail on every report.
_PLACEHOLDERS = {
    "system": {"condition", "report", "definitions"},
    "direct_question": {"definition", "condition", "at_level"},
    "summary_request": {"condition"},
    "summary_question": {"definition", "condition", "at_level"},
    "level_suffix": {"level"},
}


class PromptError(ValueError):
    """A prompt variant file that cannot be used."""


def template_from_dict(data: dict, where: str) -> PromptTemplate:
    """A PromptTemplate from a mapping of its fields (others keep the paper's wording)."""
    known = {f.name for f in fields(PromptTemplate)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PromptError(f"{where}: unknown prompt fields {unknown}; known: {sorted(known)}")
    for name, allowed in _PLACEHOLDERS.items():
        if name in data:
            _check_placeholders(str(data[name]), allowed, f"{where}, field {name!r}")
    if "{report}" not in str(data.get("system", "{report}")):
        raise PromptError(f"{where}: the system field must contain {{report}}")
    template = PromptTemplate(**{k: str(v) for k, v in data.items()})
    _check_unsure_answer(template, where)
    return template


def _check_unsure_answer(template: PromptTemplate, where: str) -> None:
    """An unsure answer is one word that the wording itself offers the model: a word it is
    never told about would get almost no probability, and the score would not change."""
    word = template.unsure_answer
    if not word:
        return
    if len(word.split()) != 1:
        raise PromptError(f"{where}: unsure_answer must be one word (such as 'maybe'), "
                          f"got {word!r}")
    offered = (template.system + template.direct_question + template.summary_question).lower()
    if word.lower() not in offered:
        raise PromptError(f"{where}: unsure_answer {word!r} is not offered by the wording: "
                          "say in the system message or the question when to answer it")


def _check_placeholders(text: str, allowed: set[str], where: str) -> None:
    try:
        text.format(**{name: "" for name in allowed})
    except (KeyError, IndexError, ValueError) as err:
        raise PromptError(f"{where}: bad placeholder {err} (allowed: "
                          f"{', '.join('{' + a + '}' for a in sorted(allowed))}); write a literal "
                          "brace as {{ or }}") from err


def load_prompt_variants(path: str | Path) -> list[PromptTemplate]:
    """Prompt variants from YAML: one mapping, or a list of mappings each with a unique `name`;
    or a built-in variant's name (`paper`, `report_first`, `definitions_first`), which is looked
    up before files."""
    if str(path) in BUILTIN_TEMPLATES:
        return [BUILTIN_TEMPLATES[str(path)]]
    if not Path(path).is_file():
        raise PromptError(f"{path}: neither a prompt file nor a built-in variant "
                          f"({', '.join(BUILTIN_TEMPLATES)})")
    data = yaml.safe_load(Path(path).read_text())
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(i, dict) for i in items):
        raise PromptError(f"{path}: expected a mapping of prompt fields or a list of them")
    variants = [template_from_dict(item, f"{path}, variant {n}") for n, item in enumerate(items)]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise PromptError(f"{path}: variant names must be unique, got {names}")
    return variants


def load_prompt(path: str | Path, name: str | None = None) -> PromptTemplate:
    """One variant from a prompt file (or a built-in variant's name): the only one, or the one
    called `name`."""
    variants = load_prompt_variants(path)
    if name is None and len(variants) == 1:
        return variants[0]
    chosen = [v for v in variants if v.name == name]
    if not chosen:
        raise PromptError(f"{path}: choose a variant with --prompt-name, one of "
                          f"{[v.name for v in variants]} (got {name!r})")
    return chosen[0]


def run_prompt(conditions: Sequence[Condition], prompt: str | Path | None = None,
               prompt_name: str | None = None) -> PromptTemplate:
    """The wording a run over these conditions uses, bound to them: `prompt` (a prompt file or
    a built-in name; `prompt_name` picks a variant of a file with several), else the one the
    conditions ask for. The label job, Serve and fine-tuning all take it from here."""
    template = load_prompt(prompt, prompt_name) if prompt else conditions_prompt(conditions)
    return bind_conditions(template, conditions)


def _system(template: PromptTemplate, condition: Condition, report: str) -> Message:
    """The system message; with `preamble`, the number of its leading characters that are the
    same for every report of a run, which an engine may compute once (see `preamble_chars`)."""
    if "{definitions}" in template.system:
        raise PromptError(f"prompt {template.name!r} has {{definitions}} unfilled: bind it to the "
                          "run's conditions first (prompts.bind_conditions)")
    text = template.system.format(condition=condition.prompt_name, report=report)
    message = {"role": "system", "content": text}
    shared = preamble_chars(template)
    if shared:
        message["preamble"] = shared
    return message


def preamble_chars(template: PromptTemplate) -> int:
    """How many leading characters of the system message are the same for every report: the
    text before the report up to its last line break, when it names no condition (a line break
    ends a token in every tokenizer we use, so the preamble's tokens are a prefix of the
    prompt's). 0 when there is none."""
    head = template.system.split("{report}")[0]
    if "{condition}" in head or "\n" not in head:
        return 0
    return len(head[: head.rindex("\n") + 1].format())


def _question(text: str, template: PromptTemplate, condition: Condition, level: str | None) -> str:
    at_level = template.level_suffix.format(level=level) if level else ""
    return text.format(
        definition=condition.definition, condition=condition.prompt_name, at_level=at_level
    )


def _asked(template: PromptTemplate, question: str) -> Message:
    """The user turn whose answer is scored; with `unsure`, the third answer the wording offers
    (engines count its probability against yes: ChatFormatter.answers)."""
    message: Message = {"role": "user", "content": question}
    if template.unsure_answer:
        message["unsure"] = template.unsure_answer
    return message


def _few_shot_turns(template: PromptTemplate, condition: Condition,
                    examples: Sequence[FewShotExample] | None = None) -> Conversation:
    """Worked examples (`examples`, else the condition's own) as earlier user/assistant turns,
    each carrying its own report."""
    turns: Conversation = []
    for example in condition.few_shot if examples is None else examples:
        question = _question(template.direct_question, template, condition, None)
        turns.append({"role": "user", "content": f"Report: {example.report}\n{question}"})
        turns.append({"role": "assistant", "content": example.answer})
    return turns


def direct_conversation(
    template: PromptTemplate, condition: Condition, report: str, level: str | None = None,
    examples: Sequence[FewShotExample] | None = None,
) -> Conversation:
    """Direct query; the answer token follows the opened assistant turn. `examples` replaces
    the condition's hand-written few-shot examples (the labeller passes those picked per
    report, ray_app.labelling.few_shot). After examples, the question carries its report again,
    as each example's does: asked "based on the report" right after an example's report, a small
    model answers about that example (Qwen-1.5B on Open-i: AUROC 0.66-0.80 with retrieved
    examples, 0.96-0.98 without)."""
    question = _question(template.direct_question, template, condition, level)
    turns = _few_shot_turns(template, condition, examples)
    if turns:
        question = f"Report: {report}\n{question}"
    return [_system(template, condition, report), *turns, _asked(template, question)]


def summary_request_conversation(
    template: PromptTemplate, condition: Condition, report: str
) -> Conversation:
    """Summary-then-query, step 1: the model completes this with a summary."""
    request = template.summary_request.format(condition=condition.prompt_name)
    return [_system(template, condition, report), {"role": "user", "content": request}]


def summary_question_conversation(
    template: PromptTemplate,
    condition: Condition,
    report: str,
    summary: str,
    level: str | None = None,
) -> Conversation:
    """Summary-then-query, step 2: the summary becomes the assistant's turn, then the question."""
    question = _question(template.summary_question, template, condition, level)
    return [
        *summary_request_conversation(template, condition, report),
        {"role": "assistant", "content": summary},
        _asked(template, question),
    ]


def question_levels(condition: Condition) -> list[str | None]:
    """One overall question, then one per level (a level-specific condition gets both)."""
    return [None, *condition.levels]
