"""A rule-based labeller in the NegEx / CheXpert style, to show what the LLM adds over rules.

Each condition's `synonyms` are matched case-insensitively (spaCy's entity ruler); negspacy's
NegEx marks negated mentions, and a second NegEx pass with uncertainty cues marks hedged ones.
Per report and condition, like CheXpert: a mention neither negated nor hedged -> 1.0; only hedged
mentions -> 0.5; none, or only negated -> 0.0. The scores go through the same evaluation as the
LLM's. The report sections a condition drops (e.g. the clinical history) are dropped here too.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib.metadata import version
from typing import Any, Sequence

from ray_app.labelling.conditions import Condition
from ray_app.labelling.labeller import LABEL_COLUMNS, ReportTask
from ray_app.labelling.sections import drop_sections
from ray_app.provenance import code_version, utc_now

# Hedges that negspacy's clinical termset lists as negations ("cannot exclude X" is not a no).
_HEDGES_IN_NEGATIONS = {"cannot", "can't", "cant", "versus", "doubt", "not rule out",
                        "not ruled out", "not been ruled out"}
# spaCy splits "cannot" into "can" + "not", and "not" alone is a negation: these phrases are
# declared pseudo-negations so that the "not" inside them is ignored.
_HEDGED_NOTS = ["cannot exclude", "can not exclude", "cannot be excluded", "can not be excluded",
                "not excluded", "cannot rule out", "can not rule out", "cannot be ruled out",
                "not ruled out", "not rule out", "not been ruled out"]
UNCERTAINTY_CUES = {
    "preceding_negations": [
        "possible", "possibly", "probable", "probably", "may", "might", "questionable",
        "question of", "suspicious for", "suspected", "suspect", "suggestive of", "suggests",
        "suggesting", "concern for", "concerning for", "cannot exclude", "can not exclude",
        "cannot rule out", "could represent", "may represent", "versus", "vs", "likely",
        "differential", "equivocal", "indeterminate",
    ],
    "following_negations": [
        "not excluded", "cannot be excluded", "can not be excluded", "is not excluded",
        "not ruled out", "cannot be ruled out", "is possible", "is suspected", "?",
    ],
    "pseudo_negations": ["no change", "not changed", "unchanged"],
}
_MORE_NEGATIONS = {"preceding_negations": ["no evidence of", "clear of", "resolution of"],
                   "following_negations": ["resolved", "has resolved", "have resolved"],
                   "pseudo_negations": _HEDGED_NOTS}
METHOD = "rules"
ENGINE = "rules"


class RuleLabeller:
    """Scores reports for conditions by synonym matching with negation and uncertainty."""

    def __init__(self, conditions: Sequence[Condition]):
        missing = [c.name for c in conditions if not c.synonyms]
        if missing:
            raise ValueError(f"conditions {missing} have no 'synonyms' in their YAML spec; add "
                             "the phrases the rule baseline should look for")
        self.conditions = {c.name: c for c in conditions}  # as Labeller.conditions
        self.nlp = _pipeline(conditions)
        self.model_id = rules_model_id()
        self.prompt_hash = rules_hash(conditions)

    def label(self, tasks: Sequence[ReportTask]) -> list[dict[str, Any]]:
        """One row per (report, condition, level), in the labelling job's columns; the same
        call as Labeller.label, so the labelling job runs either."""
        stamp = utc_now()
        rows = []
        for condition in self.conditions.values():
            todo = [t for t in tasks if t.conditions is None or condition.name in t.conditions]
            texts = (drop_sections(t.text, condition.drop_sections) for t in todo)
            for task, doc in zip(todo, self.nlp.pipe(texts)):
                for level in (None, *condition.levels):
                    score = mention_score(doc, condition.name, level)
                    rows.append(self._row(task.report_id, condition, level, score, stamp))
        return rows

    def _row(self, report_id: str, condition: Condition, level: str | None, score: float,
             stamp: str) -> dict[str, Any]:
        row = dict.fromkeys(LABEL_COLUMNS)
        row.update(report_id=report_id, condition=condition.name, level=level, method=METHOD,
                   score=score, truncated=False, model=self.model_id, engine=ENGINE,
                   definition_hash=condition.definition_hash(), prompt_hash=self.prompt_hash,
                   code_version=code_version(), labelled_at=stamp)
        return row


def mention_score(doc, label: str, level: str | None) -> float:
    """1.0 / 0.5 / 0.0 from the mentions of `label`; for a level, only mentions in sentences
    that name the level count."""
    mentions = [e for e in doc.ents if e.label_ == label]
    if level is not None:
        pattern = _level_pattern(level)
        mentions = [e for e in mentions if pattern.search(e.sent.text)]
    live = [e for e in mentions if not e._.negex]
    if any(not e._.uncertain for e in live):
        return 1.0
    return 0.5 if live else 0.0


def _level_pattern(level: str) -> re.Pattern:
    """'L4-L5' also written L4-5, L4/5, L4/L5 or L4 L5: the lower vertebra's letter may be left
    out when it repeats the upper's."""
    upper, _, lower = (re.escape(part) for part in level.partition("-"))
    if lower[:1] == upper[:1]:
        lower = f"(?:{lower[0]})?{lower[1:]}"
    return re.compile(rf"\b{upper}\s*[-/ ]\s*{lower}\b", re.IGNORECASE)


def _pipeline(conditions: Sequence[Condition]):
    import negspacy.negation  # noqa: F401  registers the 'negex' pipe factory
    import spacy
    from negspacy.termsets import termset

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    ruler = nlp.add_pipe("entity_ruler", config={"phrase_matcher_attr": "LOWER"})
    ruler.add_patterns([{"label": c.name, "pattern": s.lower()} for c in conditions
                        for s in c.synonyms])
    clinical = termset("en_clinical").get_patterns()
    negations = {k: [t for t in v if t not in _HEDGES_IN_NEGATIONS] + _MORE_NEGATIONS.get(k, [])
                 for k, v in clinical.items()}
    hedges = {**UNCERTAINTY_CUES, "termination": clinical["termination"]}
    nlp.add_pipe("negex", name="negation", config={"neg_termset": negations})
    nlp.add_pipe("negex", name="uncertainty",
                 config={"neg_termset": hedges, "extension_name": "uncertain"})
    return nlp


def rules_model_id() -> str:
    return f"rules:negspacy-{version('negspacy')}"


def rules_hash(conditions: Sequence[Condition]) -> str:
    """Hash of the synonyms and cue lists: the rule baseline's counterpart of a prompt hash."""
    payload = json.dumps({"synonyms": {c.name: list(c.synonyms) for c in conditions},
                          "uncertainty": UNCERTAINTY_CUES, "negation_extra": _MORE_NEGATIONS,
                          "removed": sorted(_HEDGES_IN_NEGATIONS)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
