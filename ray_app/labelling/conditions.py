"""Condition specs: one YAML file per condition, validated on load.

A condition is data, not code: a user adds one by writing a YAML file and passing its path
wherever a built-in name is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ray_app.labelling.sections import SECTION_KINDS

_BUILTIN_PACKAGE = "ray_app.labelling.condition_specs"
_ANSWERS = ("yes", "no")
UNITS = ("report", "sentence")  # what a question is asked about (Condition.unit)
AUTO = "auto"  # `few_shot: auto`: examples picked per report from an example pool (few_shot.py)
DEFAULT_FEW_SHOT_K = 4
# How few-shot turns are laid out (ray_app.labelling.prompts.direct_conversation); part of the
# definition hash of conditions with examples, so labels made with another layout are not mixed.
FEW_SHOT_LAYOUT = "question-restates-report:v2"


class ConditionError(ValueError):
    """A condition spec is missing, malformed or unknown."""


@dataclass(frozen=True)
class FewShotExample:
    """A worked example shown to the model before the real report."""

    report: str = field(metadata={"doc": "Example report text."})
    answer: str = field(metadata={"doc": "'yes' or 'no'."})


@dataclass(frozen=True)
class Condition:
    """What to ask about a report, and which parts of the report the model may see."""

    name: str = field(metadata={"doc": "Identifier used in outputs and calibration files."})
    definition: str = field(metadata={"doc": "One-sentence definition put before the question."})
    display_name: str = field(default="", metadata={"doc": "Wording used in the prompt."})
    levels: tuple[str, ...] = field(
        default=(), metadata={"doc": "Level-specific questions (e.g. L4-L5); empty for none."}
    )
    drop_sections: tuple[str, ...] = field(
        default=(), metadata={"doc": "Section kinds left out of the prompt (e.g. history)."}
    )
    few_shot: tuple[FewShotExample, ...] = field(
        default=(), metadata={"doc": "Optional worked examples (off by default in the method)."}
    )
    few_shot_k: int = field(default=0, metadata={
        "doc": "With `few_shot: auto`: examples picked per report from the example pool, half "
               "of each answer (after any hand-written ones); 0: none picked."})
    few_shot_pool: str = field(default="", metadata={
        "doc": "Identity of the example pool the picked examples come from; set by the job "
               "that loads the pool (ray_app.labelling.few_shot.bind_pool), not in the YAML."})
    synonyms: tuple[str, ...] = field(
        default=(), metadata={"doc": "Phrases the rule baseline looks for; not shown to the LLM."}
    )
    unit: str = field(default="report", metadata={
        "doc": "What each question is asked about: 'report' (the kept sections whole) or "
               "'sentence' (each sentence of them apart; the report scores as its highest "
               "sentence, which its rows keep as evidence)."})
    prompt: str = field(default="", metadata={
        "doc": "Built-in prompt variant (e.g. report_first) a run uses when it names none; "
               "empty: the paper's wording. Covered by the prompt hash, not the definition's."})

    @property
    def prompt_name(self) -> str:
        return self.display_name or self.name.replace("_", " ")

    @property
    def few_shot_auto(self) -> bool:
        return self.few_shot_k > 0

    def definition_hash(self) -> str:
        """Hash of everything in the spec that changes what the model is asked."""
        fields = {
            "display_name": self.prompt_name,
            "definition": self.definition,
            "levels": list(self.levels),
            "drop_sections": sorted(self.drop_sections),
            "few_shot": [[e.report, e.answer] for e in self.few_shot],
        }
        if self.few_shot_auto:  # only then: every other condition keeps its hash
            fields["few_shot_auto"] = {"k": self.few_shot_k, "pool": self.few_shot_pool}
        if self.few_shot or self.few_shot_auto:  # the question after examples restates its report
            fields["few_shot_layout"] = FEW_SHOT_LAYOUT
        if self.unit != "report":  # only then: report-unit conditions keep their hash
            fields["unit"] = self.unit
        payload = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# The keys a condition YAML may have: every Condition field but the example pool's identity,
# which the job that loads the pool sets.
_ALLOWED_KEYS = {f.name for f in dataclasses.fields(Condition)} - {"few_shot_pool"}


def condition_from_dict(data: dict, source: str) -> Condition:
    """Validate a parsed YAML mapping; `source` names the file in error messages."""
    if not isinstance(data, dict):
        raise ConditionError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    unknown = set(data) - _ALLOWED_KEYS
    if unknown:
        raise ConditionError(
            f"{source}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_ALLOWED_KEYS)}"
        )
    name = _required_text(data, "name", source)
    definition = _required_text(data, "definition", source)
    levels = _text_list(data.get("levels") or [], "levels", source)
    if len(set(levels)) != len(levels):
        raise ConditionError(f"{source}: 'levels' has duplicates: {levels}")
    drops = _text_list(data.get("drop_sections") or [], "drop_sections", source)
    bad = [d for d in drops if d not in SECTION_KINDS]
    if bad:
        raise ConditionError(
            f"{source}: drop_sections {bad} are not section kinds; use some of {list(SECTION_KINDS)}"
        )
    examples, auto = _few_shot(data.get("few_shot") or [], source)
    condition = Condition(
        name=name,
        definition=definition,
        display_name=str(data.get("display_name") or ""),
        levels=tuple(levels),
        drop_sections=tuple(drops),
        few_shot=tuple(examples),
        few_shot_k=_few_shot_k(data, auto, source),
        synonyms=tuple(_text_list(data.get("synonyms") or [], "synonyms", source)),
        prompt=_preferred_prompt(data, source),
    )
    return with_unit(condition, data.get("unit") or "report", source)


_REQUIRED_HINTS = {
    "name": "the identifier used in outputs and calibrations, e.g. name: foraminal_stenosis",
    "definition": "one sentence put before the question, e.g. definition: Foraminal stenosis "
                  "is narrowing of an intervertebral foramen of any grade.",
}


def _required_text(data: dict, key: str, source: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConditionError(f"{source}: '{key}' must be a non-empty string ("
                             f"{'missing' if value is None else repr(value)}); add "
                             f"{_REQUIRED_HINTS.get(key, key)}")
    return value.strip()


def _text_list(value: object, key: str, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConditionError(f"{source}: '{key}' must be a list of non-empty strings")
    return [v.strip() for v in value]


def _is_auto(item: object) -> bool:
    return isinstance(item, str) and item.strip().lower() == AUTO


def _few_shot(value: object, source: str) -> tuple[list[FewShotExample], bool]:
    """Hand-written examples, and whether examples are also picked per report: `few_shot: auto`,
    or `auto` as one item of the list (after the hand-written ones)."""
    if _is_auto(value):
        return [], True
    if not isinstance(value, list):
        raise ConditionError(f"{source}: 'few_shot' must be a list of {{report, answer}} "
                             f"(optionally with one 'auto' item) or 'auto', got {value!r}")
    autos = [i for i, item in enumerate(value) if _is_auto(item)]
    if len(autos) > 1:
        raise ConditionError(f"{source}: 'few_shot' lists 'auto' {len(autos)} times; once is "
                             "enough (set how many examples with few_shot_k)")
    examples = []
    for i, item in enumerate(value):
        if i in autos:
            continue
        if not isinstance(item, dict) or set(item) != {"report", "answer"}:
            raise ConditionError(f"{source}: few_shot[{i}] must have exactly 'report' and 'answer'")
        raw = item["answer"]
        # YAML reads an unquoted yes/no as a boolean.
        answer = ("yes" if raw else "no") if isinstance(raw, bool) else str(raw).strip().lower()
        if answer not in _ANSWERS:
            raise ConditionError(f"{source}: few_shot[{i}].answer must be 'yes' or 'no'")
        examples.append(FewShotExample(report=str(item["report"]), answer=answer))
    return examples, bool(autos)


def _few_shot_k(data: dict, auto: bool, source: str) -> int:
    if "few_shot_k" not in data:
        return DEFAULT_FEW_SHOT_K if auto else 0
    k = data["few_shot_k"]
    if not auto:
        raise ConditionError(f"{source}: 'few_shot_k' is only used with 'few_shot: auto'; add "
                             "few_shot: auto or remove few_shot_k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2 or k % 2:
        raise ConditionError(f"{source}: 'few_shot_k' must be an even whole number of at least "
                             f"2 (half 'yes' examples, half 'no'), got {k!r}")
    return k


def with_unit(condition: Condition, unit: object, source: str = "") -> Condition:
    """The condition asked about each `unit` ('report' or 'sentence') of a report; `source`
    names the YAML file in errors (else the condition is named)."""
    where = f"{source}: " if source else f"condition {condition.name}: "
    if unit not in UNITS:
        raise ConditionError(f"{where}'unit' must be one of {list(UNITS)}, got {unit!r}")
    if unit == "sentence" and (condition.few_shot or condition.few_shot_auto):
        # An example is a whole report with its answer; a sentence-by-sentence question
        # would be shown reports where it is asked about one sentence.
        raise ConditionError(f"{where}'unit: sentence' does not take few_shot examples (they "
                             "are whole reports); remove few_shot or use unit: report")
    return dataclasses.replace(condition, unit=unit)


def _preferred_prompt(data: dict, source: str) -> str:
    value = data.get("prompt") or ""
    # Imported here: prompts.py builds on this module.
    from ray_app.labelling.prompts import BUILTIN_TEMPLATES

    if value and value not in BUILTIN_TEMPLATES:
        raise ConditionError(f"{source}: 'prompt' must name a built-in prompt variant "
                             f"({', '.join(BUILTIN_TEMPLATES)}), got {value!r}; a prompt file "
                             "is chosen per run with --prompt")
    return str(value)


def builtin_condition_names() -> list[str]:
    files = resources.files(_BUILTIN_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def load_condition(name_or_path: str | Path) -> Condition:
    """Load a built-in condition by name, or a user's YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConditionError(f"condition file {path} does not exist; pass a built-in "
                                 f"condition name ({', '.join(builtin_condition_names())}) or "
                                 "the path of your own YAML file")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConditionError(f"cannot read condition file {path}: {err}") from err
        return _load_yaml(text, str(path))
    spec = resources.files(_BUILTIN_PACKAGE) / f"{name_or_path}.yaml"
    if not spec.is_file():
        builtins = builtin_condition_names()
        close = difflib.get_close_matches(str(name_or_path), builtins, n=1)
        raise ConditionError(
            f"unknown condition {str(name_or_path)!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f": built-ins are {builtins}; or pass the path of your own YAML file"
        )
    return _load_yaml(spec.read_text(), f"built-in condition {name_or_path}")


def load_conditions(names_or_paths: list[str]) -> list[Condition]:
    conditions = [load_condition(n) for n in names_or_paths]
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ConditionError(f"the same condition is named twice: {names}")
    return conditions


def _load_yaml(text: str, source: str) -> Condition:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConditionError(f"{source}: not valid YAML: {err}") from err
    return condition_from_dict(data, source)
