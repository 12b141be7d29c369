"""Remembered scores: a question asked again is answered without the engine, with the score
the engine gave it; repeats within one call reach the engine once; the cache stays bounded."""

import dataclasses

import pytest

from ray_app.labelling.conditions import load_condition
from ray_app.labelling.labeller import Labeller, ReportTask
from ray_app.labelling.prompts import BUILTIN_TEMPLATES
from ray_app.labelling.score_cache import ScoreCache

DEFINITIONS_FIRST = BUILTIN_TEMPLATES["definitions_first"]


def conversation(text):
    return [{"role": "system", "content": "You are a radiologist."},
            {"role": "user", "content": text}]


class CountingScorer:
    """An engine's score(): a score per text, and every conversation it was asked."""

    def __init__(self):
        self.asked = []

    def __call__(self, conversations):
        self.asked.extend(c[-1]["content"] for c in conversations)
        return [len(c[-1]["content"]) / 100 for c in conversations]


def test_repeats_in_a_call_and_across_calls_are_asked_once_in_first_seen_order():
    cache, engine = ScoreCache(), CountingScorer()
    first = cache.score([conversation(t) for t in ("aa", "b", "aa", "ccc")], engine)
    assert first == [0.02, 0.01, 0.02, 0.03]
    second = cache.score([conversation(t) for t in ("b", "dddd", "aa")], engine)
    assert second == [0.01, 0.04, 0.02]
    assert engine.asked == ["aa", "b", "ccc", "dddd"]
    assert (cache.questions, cache.remembered) == (7, 3)


def test_any_difference_in_the_conversation_is_another_question():
    cache, engine = ScoreCache(), CountingScorer()
    other_system = [{"role": "system", "content": "You are a cardiologist."},
                    {"role": "user", "content": "aa"}]
    cache.score([conversation("aa"), other_system, conversation("aa ")], engine)
    assert len(engine.asked) == 3


def test_the_least_recently_used_entry_goes_first_when_full():
    cache, engine = ScoreCache(max_entries=2), CountingScorer()
    cache.score([conversation("a"), conversation("b")], engine)
    cache.score([conversation("a")], engine)  # "a" used again: "b" is now the oldest
    cache.score([conversation("c")], engine)
    assert len(cache) == 2
    cache.score([conversation("a"), conversation("b")], engine)
    assert engine.asked == ["a", "b", "c", "b"]


def test_a_cache_of_no_entries_still_asks_a_repeated_question_once_per_call():
    cache, engine = ScoreCache(max_entries=0), CountingScorer()
    assert cache.score([conversation("a"), conversation("a")], engine) == [0.01, 0.01]
    cache.score([conversation("a")], engine)
    assert engine.asked == ["a", "a"] and len(cache) == 0


def test_a_negative_size_is_refused():
    with pytest.raises(ValueError, match="0 or more entries"):
        ScoreCache(-1)


# --- in the labeller, with a tiny model ----------------------------------------------------------

REPEATED = "No suspicious marrow lesion."
TASKS = [ReportTask("a", f"FINDINGS: Moderate central canal stenosis at L4-L5. {REPEATED}"),
         ReportTask("b", f"FINDINGS: {REPEATED} Mild disc bulge at L3-L4."),
         ReportTask("c", f"FINDINGS: {REPEATED}")]


@pytest.fixture(scope="module")
def by_sentence():
    return [dataclasses.replace(load_condition("spinal_cancer"), unit="sentence")]


def spy(engine, monkeypatch):
    seen = []
    score = engine.score
    monkeypatch.setattr(engine, "score", lambda asked: seen.extend(asked) or score(asked))
    return seen


def test_a_sentence_repeated_across_reports_is_scored_once_with_the_same_rows(
        tiny_engine, by_sentence, monkeypatch):
    uncached = [row for task in TASKS  # each report alone, nothing remembered
                for row in Labeller(tiny_engine, by_sentence, template=DEFINITIONS_FIRST,
                                    score_cache=ScoreCache(0)).label([task])]
    seen = spy(tiny_engine, monkeypatch)
    labeller = Labeller(tiny_engine, by_sentence, template=DEFINITIONS_FIRST)
    rows = labeller.label(TASKS[:2]) + labeller.label(TASKS[2:])
    assert len(seen) == 3  # the two sentences of a, b's new one; c's only sentence is a repeat
    assert labeller.score_cache.remembered == 1 + 1
    for row, alone in zip(rows, uncached):
        assert row["evidence"] == alone["evidence"]
        assert row["score"] == pytest.approx(alone["score"], abs=1e-3)  # batch numerics
    assert rows[2]["score"] == labeller.score_cache.score(
        labeller.engine_prompts(TASKS[2:]), lambda _: pytest.fail("asked the engine"))[0]


def test_engine_prompts_lists_each_distinct_question_once(tiny_engine, by_sentence):
    prompts = Labeller(tiny_engine, by_sentence, template=DEFINITIONS_FIRST).engine_prompts(TASKS)
    assert len(prompts) == 3
    assert sum(REPEATED in str(p) for p in prompts) == 1
