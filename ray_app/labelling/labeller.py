"""The labeller: reports and conditions in, one scored row per (report, condition, level) out.

Plain Python with no Ray in it; the Ray Data job and the Serve app are thin layers around it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from ray_app.engines.base import Engine
from ray_app.evaluation.calibration import Calibration
from ray_app.labelling import prompts
from ray_app.labelling.conditions import Condition, FewShotExample
from ray_app.labelling.few_shot import ExamplePool, FewShotError, bind_pool, pool_users
from ray_app.labelling.prompts import DEFAULT_TEMPLATE, Conversation, PromptTemplate
from ray_app.labelling.score_cache import ScoreCache, question_key
from ray_app.labelling.sections import drop_sections, shorten_report, split_sentences
from ray_app.pipeline.report_tables import LABEL_SCHEMA
from ray_app.provenance import code_version, utc_now

log = logging.getLogger(__name__)

# Columns of every label row, in output order: the label table's schema is their one definition.
LABEL_COLUMNS = tuple(LABEL_SCHEMA.names)


@dataclass(frozen=True)
class ReportTask:
    """One report and the conditions still to label for it."""

    report_id: str
    text: str
    conditions: tuple[str, ...] | None = None  # None: every condition of the labeller


@dataclass
class _Item:
    """One (report, condition) on its way through the prompts."""

    report_id: str
    condition: Condition
    report: str
    truncated: bool
    summary: str | None = None
    examples: tuple[FewShotExample, ...] = ()  # picked for this report (few_shot: auto)
    sentences: tuple[str, ...] = ()  # what it is asked about one by one (unit: sentence)


class Labeller:
    def __init__(
        self,
        engine: Engine,
        conditions: Sequence[Condition],
        method: str = "direct",
        template: PromptTemplate = DEFAULT_TEMPLATE,
        calibration: Calibration | None = None,
        calibrate_every_condition: bool = True,
        few_shot_pool: ExamplePool | None = None,
        score_cache: ScoreCache | None = None,
    ):
        """`calibrate_every_condition=False` lets conditions the calibration lacks through with
        scores only (the endpoint refuses them per request instead); a calibration made for
        another model, prompt or definition is refused either way. `few_shot_pool` is where
        conditions with `few_shot: auto` take their examples from (required for them with the
        direct method); its identity becomes part of their definition hash. `score_cache`
        remembers the direct method's scores by question (default: DEFAULT_ENTRIES of them;
        ScoreCache(0) asks the engine every question, once per call)."""
        if method not in prompts.METHODS:
            raise ValueError(f"method {method!r} is not one of {prompts.METHODS}")
        by_sentence = [c.name for c in conditions if c.unit == "sentence"]
        if by_sentence and method == "summary":
            raise ValueError(f"condition(s) {by_sentence} are asked sentence by sentence "
                             "(unit: sentence), which the summary method does not do: use the "
                             "direct method, or condition files with unit: report")
        needs_pool = pool_users(conditions, method)
        if needs_pool and few_shot_pool is None:
            raise FewShotError(f"condition(s) {needs_pool} ask for 'few_shot: auto' but no "
                               "example pool was given (few_shot_pool and few_shot_truth)")
        self.pool = few_shot_pool if needs_pool else None
        if self.pool is not None:
            self.pool.check(conditions)
            conditions = bind_pool(conditions, self.pool)
        self.engine = engine
        self.score_cache = score_cache if score_cache is not None else ScoreCache()
        self.conditions = {c.name: c for c in conditions}
        self.method = method
        self.template = prompts.bind_conditions(template, conditions)
        self.prompt_hash = self.template.template_hash(method)
        self.calibration = calibration
        if calibration is not None:
            for c in conditions:
                if not calibrate_every_condition and c.name not in calibration.definition_hashes:
                    continue
                calibration.check_applies(
                    engine.model_id, self.prompt_hash, c.name, c.definition_hash()
                )

    def label(self, tasks: Sequence[ReportTask]) -> list[dict[str, Any]]:
        items = self._items(tasks)
        questions = _questions(items)
        if self.method == "summary":
            answers = [(score, None) for score in self._summarise_and_score(items)]
        else:
            answers = self._ask(questions)
        stamp = utc_now()
        return [self._row(item, level, score, evidence, stamp)
                for (item, level), (score, evidence) in zip(questions, answers)]

    def _ask(self, questions: list[tuple[_Item, str | None]]) -> list[tuple[float, str | None]]:
        """Each question's score, in one engine call, and the sentence it came from: a
        condition with `unit: sentence` is asked about each sentence of the report, and the
        report scores as its highest (a finding is present if one sentence states it). A
        question asked before (a sentence that recurs across reports) is not asked again."""
        asked = _engine_order(questions)
        scored = self.score_cache.score(self._conversations(questions, asked), self.engine.score)
        answers: list[list[tuple[float, str | None]]] = [[] for _ in questions]
        for (k, sentence), score in zip(asked, scored):
            answers[k].append((score, sentence))
        return [max(own, key=lambda answer: answer[0]) for own in answers]

    def engine_prompts(self, tasks: Sequence[ReportTask]) -> list[Conversation]:
        """The conversations that `label(tasks)` (direct method) asks an engine with nothing
        remembered, in its order: each distinct question once. What a benchmark counts the
        tokens of, and what the job's engine probe asks past the cache."""
        questions = _questions(self._items(tasks))
        asked = self._conversations(questions, _engine_order(questions))
        return list({question_key(c): c for c in asked}.values())

    def _conversations(self, questions: list[tuple[_Item, str | None]],
                       asked: list[tuple[int, str | None]]) -> list[Conversation]:
        """The conversation of each (question index, sentence) pair of `_engine_order`."""
        return [self._question(*questions[k], sentence=sentence) for k, sentence in asked]

    def _items(self, tasks: Sequence[ReportTask]) -> list[_Item]:
        return [self._prepare(t.report_id, t.text, self.conditions[name])
                for t in tasks for name in (t.conditions or tuple(self.conditions))]

    def _prepare(self, report_id: str, text: str, condition: Condition) -> _Item:
        report = drop_sections(text, condition.drop_sections)
        examples = self._examples(report_id, report, condition)
        pieces = split_sentences(report) if condition.unit == "sentence" else ()
        if pieces:  # asked sentence by sentence: each sentence must fit, not the whole report
            sentences = tuple(shorten_report(s, lambda r: self._fits(r, condition))
                              for s in pieces)
            shortened, truncated = report, sentences != pieces
        else:
            shortened = shorten_report(report, lambda r: self._fits(r, condition, examples))
            truncated = shortened != report
            # A sentence unit whose report has no sentence with words: asked about as it is.
            sentences = (shortened,) if condition.unit == "sentence" else ()
        if truncated:
            log.warning("report %s shortened to fit %d tokens (%s)", report_id,
                        self.engine.config.max_context_tokens, condition.name)
        return _Item(report_id, condition, shortened, truncated=truncated,
                     examples=examples, sentences=sentences)

    def _examples(self, report_id: str, report: str,
                  condition: Condition) -> tuple[FewShotExample, ...]:
        """The pool's examples for this report, as many as fit beside the whole report: the
        least similar pair goes first (the report itself is shortened only without them)."""
        if self.pool is None or not condition.few_shot_auto:
            return ()
        picked = list(self.pool.nearest(condition, report_id, report))
        examples = list(picked)
        while examples and not self._fits(report, condition, tuple(examples)):
            for answer in ("yes", "no"):  # examples are ordered least similar first
                first = next((e for e in examples if e.answer == answer), None)
                if first is not None:
                    examples.remove(first)
        if len(examples) < len(picked):
            log.warning("report %s: %d of %d few-shot examples left out to fit %d tokens (%s)",
                        report_id, len(picked) - len(examples), len(picked),
                        self.engine.config.max_context_tokens, condition.name)
        return tuple(examples)

    def _fits(self, report: str, condition: Condition,
              examples: tuple[FewShotExample, ...] = ()) -> bool:
        """Does the longest prompt for this report fit the context, answer/summary and any
        picked few-shot examples included?"""
        longest_level = max(prompts.question_levels(condition), key=lambda lv: len(lv or ""))
        item = _Item("", condition, report, False, examples=examples)
        reserve = 1 + (self.engine.config.max_new_tokens if self.method == "summary" else 0)
        return self.engine.fits(self._question(item, longest_level),
                                self.engine.config.max_context_tokens - reserve)

    def _summarise_and_score(self, items: list[_Item]) -> list[float]:
        """Each item's summary, then its questions asked after it; scores in question order.
        The summaries come back with the scores and are kept on the items for their rows."""
        requests = [prompts.summary_request_conversation(self.template, i.condition, i.report)
                    for i in items]

        def follow_ups(index: int, summary: str) -> list[Conversation]:
            item = items[index]
            return [self._question(item, level, summary)
                    for level in prompts.question_levels(item.condition)]

        generations, scores = self.engine.generate_then_score(requests, follow_ups)
        for item, generation in zip(items, generations):
            item.summary = generation.text
        return [score for item_scores in scores for score in item_scores]

    def _question(self, item: _Item, level: str | None, summary: str = "",
                  sentence: str | None = None) -> Conversation:
        """The conversation asking about the report, or about one of its sentences in the
        report's place."""
        if self.method == "summary":
            return prompts.summary_question_conversation(
                self.template, item.condition, item.report, summary, level
            )
        examples = (*item.condition.few_shot, *item.examples) if item.examples else None
        return prompts.direct_conversation(self.template, item.condition, sentence or item.report,
                                           level, examples=examples)

    def _row(self, item: _Item, level: str | None, score: float, evidence: str | None,
             stamp: str) -> dict[str, Any]:
        entry = self.calibration.entry(item.condition.name, level) if self.calibration else None
        return {
            "report_id": item.report_id,
            "condition": item.condition.name,
            "level": level,
            "method": self.method,
            "score": float(score),
            "label": None if entry is None else bool(score >= entry.threshold),
            "threshold": None if entry is None else entry.threshold,
            "uncertain": None if entry is None else entry.is_uncertain(score),
            "summary": item.summary,
            "evidence": evidence,
            "truncated": item.truncated,
            "model": self.engine.model_id,
            "engine": self.engine.name,
            "definition_hash": item.condition.definition_hash(),
            "prompt_hash": self.prompt_hash,
            "calibration_id": self.calibration.calibration_id if self.calibration else None,
            "code_version": code_version(),
            "labelled_at": stamp,
        }


def _questions(items: list[_Item]) -> list[tuple[_Item, str | None]]:
    """(item, level) per question: the overall one (level None) and one per level."""
    return [(item, level) for item in items for level in prompts.question_levels(item.condition)]


def _engine_order(questions: list[tuple[_Item, str | None]]) -> list[tuple[int, str | None]]:
    """(question index, sentence or None for the whole report) in the order the engine is
    asked them: report by report and, within a report, sentence by sentence (a stable sort).
    The engine runs a shared prefix once only for consecutive prompts, and a report's questions
    about one sentence (one per condition and level) share all but their question."""
    asked = [(k, sentence) for k, (item, _) in enumerate(questions)
             for sentence in item.sentences or (None,)]
    report_rank: dict[str, int] = {}
    for item, _ in questions:
        report_rank.setdefault(item.report_id, len(report_rank))
    return sorted(asked, key=lambda pair: (report_rank[questions[pair[0]][0].report_id],
                                           pair[1] or ""))
