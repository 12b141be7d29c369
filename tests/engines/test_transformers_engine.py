"""The transformers engine on a tiny random model: batching, padding, shared prefixes."""

import pytest
import torch
from tiny_model import force_next_tokens, scores_one_by_one

from ray_app.engines import EngineConfig, make_engine
from ray_app.engines.base import _split_key
from ray_app.engines.transformers_engine import (
    _common_prefix_len,
    first_messages,
    shared_prefix_groups,
)
from ray_app.labelling import prompts
from ray_app.labelling.conditions import load_condition

REPORTS = [
    "FINDINGS: Severe central canal stenosis at L4-L5.\nIMPRESSION: Severe stenosis.",
    "No stenosis. Normal alignment.",
    "CLINICAL HISTORY: ?mets.\nFINDINGS: Lytic lesion in L2 with epidural extension. "
    "Moderate stenosis at L1-L2 and L2-L3.\nIMPRESSION: Metastasis.",
]


@pytest.fixture(scope="module")
def conversations():
    stenosis, cancer = load_condition("spinal_canal_stenosis"), load_condition("spinal_cancer")
    convs = []
    for report in REPORTS:
        for condition in (cancer, stenosis):
            for level in prompts.question_levels(condition):
                convs.append(prompts.direct_conversation(prompts.DEFAULT_TEMPLATE, condition,
                                                         report, level))
    return convs


def test_scores_match_unbatched_forward(tiny_engine, conversations):
    expected = scores_one_by_one(tiny_engine, conversations)
    got = tiny_engine.score(conversations)
    assert len(got) == len(conversations) == 3 * (1 + 6)
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5
    assert len({round(s, 4) for s in got}) > 5  # the tiny model does discriminate prompts


def test_shared_prefix_path_equals_plain_batching(tiny_model_dir, conversations):
    shared = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir), batch_size=3, min_shared_prefix=8))
    plain = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir), batch_size=3,
                                     min_shared_prefix=10**9))
    encoded = [shared.formatter.token_ids(c) for c in conversations]
    groups = shared_prefix_groups(encoded, 8, first_messages(conversations))
    assert any(len(g) == 6 for g in groups), "a report's stenosis levels share one prefix"
    a, b = shared.score(conversations), plain.score(conversations)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_scores_do_not_depend_on_order_or_batch_size(tiny_model_dir, conversations):
    engine = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir), batch_size=5))
    forward = engine.score(conversations)
    backward = engine.score(conversations[::-1])[::-1]
    assert max(abs(x - y) for x, y in zip(forward, backward)) < 1e-5


@pytest.mark.parametrize(
    "encoded, keys, groups",
    [
        ([[1] * 40 + [2], [1] * 40 + [3], [4] * 40], None, [[0, 1], [2]]),
        ([[1] * 10 + [2], [1] * 10 + [3]], None, [[0], [1]]),  # prefix shorter than min_shared
        # Short report, long definitions: under half of each sequence shared, still one run.
        ([[1] * 40 + [2] * 100, [1] * 40 + [3] * 100], "aa", [[0, 1]]),
        # Two reports after a common preamble: a run per report (its key: its system message).
        ([[1] * 40 + [r] * 60 + [c] for r in (2, 3) for c in (5, 6)], "aabb", [[0, 1], [2, 3]]),
        ([[1] * 40 + [r] * 60 + [c] for r in (2, 3) for c in (5, 6)], None, [[0, 1, 2, 3]]),
        ([[1] * 40], "a", [[0]]),
        ([], "", []),
    ],
)
def test_shared_prefix_groups(encoded, keys, groups):
    assert shared_prefix_groups(encoded, 32, keys) == groups


def test_generate_is_greedy_bounded_and_batch_independent(tiny_engine, conversations):
    requests = [prompts.summary_request_conversation(
        prompts.DEFAULT_TEMPLATE, load_condition("spinal_cancer"), r) for r in REPORTS]
    together = tiny_engine.generate(requests)
    alone = [tiny_engine.generate([r])[0] for r in requests]
    assert [g.text for g in together] == [g.text for g in alone]
    for gen, request in zip(together, requests):
        assert gen.prompt_tokens == tiny_engine.count_tokens(request)
        new_tokens = tiny_engine.tokenizer.encode(gen.text, add_special_tokens=False)
        assert 0 < len(new_tokens) <= tiny_engine.config.max_new_tokens + 2


def test_dtype_and_device_resolution(tiny_model_dir):
    engine = make_engine(EngineConfig(model=str(tiny_model_dir), dtype="bfloat16"))
    assert engine.model.dtype == torch.bfloat16
    # 'auto': the GPU where torch sees one (the lent GPU machine), else the CPU
    assert next(engine.model.parameters()).device.type == ("cuda" if torch.cuda.is_available()
                                                           else "cpu")
    on_cpu = make_engine(EngineConfig(model=str(tiny_model_dir), dtype="auto", device="cpu"))
    assert next(on_cpu.model.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="dtype 'float8'"):
        make_engine(EngineConfig(model=str(tiny_model_dir), dtype="float8"))


def test_unknown_engine_and_model_errors(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown engine 'nope'"):
        make_engine(EngineConfig(engine="nope", model=str(tiny_model_dir)))
    with pytest.raises(FileNotFoundError, match="pip-installed models"):
        make_engine(EngineConfig(model="/no/such/model"))


def _summary_follow_ups(condition, report, rewrite=lambda text: text):
    def follow_ups(index, summary):
        summary = rewrite(summary)
        return [prompts.summary_question_conversation(prompts.DEFAULT_TEMPLATE, condition,
                                                      report[index], summary, level)
                for level in prompts.question_levels(condition)]
    return follow_ups


def _force_round_trip_summaries(engine) -> tuple[list[int], list[int]]:
    """The tiny model's own summaries are byte fragments that re-tokenise differently, so no
    summary token could come from the cache: make generation write "NormalNormal..." (tokens
    that re-tokenise the same), leave scoring alone, and record how many tokens of each scored
    row the cache supplied, and how many of each generation's row its follow-ups share."""
    normal, mal = engine.tokenizer.encode("Normal", add_special_tokens=False)
    forcing, reused, from_generation = [True], [], []

    force_next_tokens(engine.model, lambda ids: torch.where(ids == normal, mal, normal),
                      active=lambda: forcing[0])
    score_rows, run_stems = engine._score_rows_on_cache, engine._run_stems

    def recorded_stems(batch, questions):
        # tokens of the generation's row that some follow-up shares, before the stems run
        from_generation.extend(min(_common_prefix_len([batch.tokens[r], ids]) for ids in group)
                               for r, group in enumerate(questions))
        forcing[0] = False
        try:
            return run_stems(batch, questions)
        finally:
            forcing[0] = True

    def unforced(batch, rows):
        forcing[0] = False
        reused.extend(n for _, _, n, _ in rows)
        try:
            return score_rows(batch, rows)
        finally:
            forcing[0] = True

    engine._score_rows_on_cache = unforced
    engine._run_stems = recorded_stems
    return reused, from_generation


@pytest.mark.parametrize("rewrite", [
    lambda text: text,                  # the follow-up re-uses the whole generated summary
    lambda text: "Edited. " + text,     # it diverges at the summary's first token
    lambda text: text[: len(text) // 2],  # it shares only part of the summary
])
def test_generate_then_score_on_cache_equals_fresh_encoding(tiny_model_dir, rewrite):
    """Scoring the follow-ups on generation's KV cache gives a fresh encoding's scores, however
    much of the generated summary the follow-up conversation actually shares."""
    engine = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir), batch_size=4, max_new_tokens=12))
    reused, from_generation = _force_round_trip_summaries(engine)
    stenosis = load_condition("spinal_canal_stenosis")
    requests = [prompts.summary_request_conversation(prompts.DEFAULT_TEMPLATE, stenosis, r)
                for r in REPORTS]
    follow_ups = _summary_follow_ups(stenosis, REPORTS, rewrite)
    generations, scores = engine.generate_then_score(requests, follow_ups)
    prompt_lengths = [engine.count_tokens(r) for r in requests]
    if rewrite("x") == "x":  # the whole summary came from the generation's cache
        assert min(from_generation) >= min(prompt_lengths) + 10
    else:  # only the prompt did
        assert max(from_generation) < max(prompt_lengths) + 8
    # The six level questions' shared stem ran once per generation: each question reused all
    # of it, so only its own end ran per question.
    fresh = [follow_ups(i, g.text) for i, g in enumerate(generations)]
    encoded = [[engine.formatter.token_ids(c) for c in group] for group in fresh]
    stems = [min(_common_prefix_len(g), min(map(len, g)) - 1) for g in encoded]
    assert sorted(reused) == sorted(stem for stem in stems for _ in range(6))
    assert min(stems) > max(from_generation) + 20
    assert [g.text for g in generations] == [g.text for g in engine.generate(requests)]
    assert all(g.text.startswith("NormalNormal") for g in generations)
    expected = scores_one_by_one(engine, [c for group in fresh for c in group])
    got = [s for group in scores for s in group]
    assert [len(g) for g in scores] == [6, 6, 6]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5
    assert len({round(s, 4) for s in got}) > 3


def test_generate_then_score_default_matches_override(tiny_model_dir):
    """The base class's generate-then-score (what vLLM and custom engines get) and the cache
    path agree: the override is an optimisation, not a different method."""
    from ray_app.engines.base import Engine

    engine = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir), batch_size=2, max_new_tokens=12))
    cancer = load_condition("spinal_cancer")
    requests = [prompts.summary_request_conversation(prompts.DEFAULT_TEMPLATE, cancer, r)
                for r in REPORTS]
    follow_ups = _summary_follow_ups(cancer, REPORTS)
    gens_a, scores_a = engine.generate_then_score(requests, follow_ups)
    gens_b, scores_b = Engine.generate_then_score(engine, requests, follow_ups)
    assert [g.text for g in gens_a] == [g.text for g in gens_b]
    assert max(abs(a[0] - b[0]) for a, b in zip(scores_a, scores_b)) < 1e-5


def test_generation_stops_at_the_engines_current_stop_ids(tiny_model_dir, monkeypatch):
    """The tiny random model never ends its turn by itself: make its first greedy token a stop
    id after loading, and generation must stop right after it."""
    engine = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir), max_new_tokens=12))
    request = prompts.summary_request_conversation(
        prompts.DEFAULT_TEMPLATE, load_condition("spinal_cancer"), REPORTS[0])
    ids = torch.tensor([engine.formatter.token_ids(request)], device=engine.device)
    with torch.inference_mode():
        first = int(engine.model(input_ids=ids).logits[0, -1].argmax())
    assert len(engine.tokenizer.encode(engine.generate([request])[0].text,
                                       add_special_tokens=False)) > 3
    monkeypatch.setattr(engine, "stop_ids", [first])
    expected = engine.tokenizer.decode([first], skip_special_tokens=True).strip()
    assert engine.generate([request])[0].text == expected


@pytest.mark.parametrize("seed", range(5))
def test_common_prefix_length_is_the_tokens_all_rows_share(seed):
    import random

    rng = random.Random(seed)
    base = [rng.randrange(4) for _ in range(rng.randrange(1, 60))]
    rows = [base[: rng.randrange(len(base) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(5))]
            for _ in range(rng.randrange(1, 5))]
    expected = 0
    while (all(len(r) > expected for r in rows)
           and len({r[expected] for r in rows}) == 1):
        expected += 1
    assert _common_prefix_len(rows) == expected
    # told that the first tokens are shared (a preamble), it gives the same answer
    assert _common_prefix_len(rows, start=expected // 2) == expected


def test_fits_answers_as_the_token_count_does(tiny_engine, monkeypatch):
    short = [{"role": "user", "content": "Is there a fracture? é → 骨折 🦴"}]
    long = [{"role": "user", "content": "rib " * 300 + "é → 骨折 🦴"}]
    for conversation in (short, long):
        tokens = tiny_engine.count_tokens(conversation)
        # what the shortcut rests on: no more tokens than UTF-8 bytes
        assert tokens <= len(tiny_engine.formatter.render(conversation).encode("utf-8"))
        assert tiny_engine.fits(conversation, tokens)
        assert not tiny_engine.fits(conversation, tokens - 1)
    # far below the budget the prompt is not tokenized at all
    monkeypatch.setattr(tiny_engine.formatter, "encode", lambda texts: pytest.fail("tokenized"))
    assert tiny_engine.fits(long, 10 * len(tiny_engine.formatter.render(long).encode("utf-8")))


def _definitions_first_prompts(engine):
    conditions = [load_condition(n) for n in ("atelectasis", "cardiomegaly", "pleural_effusion")]
    template = prompts.bind_conditions(prompts.DEFINITIONS_FIRST_TEMPLATE, conditions)
    reports = ["FINDINGS: Small left effusion.\nIMPRESSION: Effusion.", "IMPRESSION: Normal.",
               "FINDINGS: Mild cardiomegaly. No effusion.", "  \n  Heart normal."]
    conversations = [prompts.direct_conversation(template, c, r)
                     for r in reports for c in conditions]
    texts = [engine.formatter.render(c) for c in conversations]
    heads = [engine.formatter.preamble_head(c, t) for c, t in zip(conversations, texts)]
    assert all(heads) and len(set(heads)) == 1
    return texts, heads


def _spy_encode(engine, monkeypatch):
    seen, encode = [], engine.formatter.encode
    monkeypatch.setattr(engine.formatter, "encode",
                        lambda texts: (seen.extend(texts), encode(texts))[1])
    return seen


def test_prompts_after_a_checked_preamble_are_tokenized_after_it(tiny_model_dir, monkeypatch):
    """A definitions-first prompt's ~500 preamble tokens are not tokenized again once a prompt
    with the same preamble and the same start after it showed that tokenizing the two apart
    gives its whole tokens; the ids are the whole text's either way."""
    engine = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir)))
    texts, heads = _definitions_first_prompts(engine)
    whole = engine.formatter.encode(texts)
    seen = _spy_encode(engine, monkeypatch)
    assert engine.formatter.encode_prompts(texts, heads) == whole
    assert len(seen) > len(texts)  # whole texts, then the checks' tails
    seen.clear()
    assert engine.formatter.encode_prompts(texts, heads) == whole
    assert len(seen) == len(texts) and not any(t.startswith(heads[0]) for t in seen)


def test_only_a_preamble_followed_by_text_is_split_off():
    """Where a tokenizer splits at the preamble's closing line break depends on what follows it
    up to its first non-space character: a prompt with only spaces there is tokenized whole."""
    head = "<|im_start|>system\nDefinitions.\n"
    assert _split_key(head, head + "Report: FINDINGS: x") == (head, "R")
    assert _split_key(head, head + "  \n Report") == (head, "  \n R")
    assert _split_key(head, head + " " * 20 + "Report") is None


def test_prompts_of_many_reports_check_their_preamble_once(tiny_model_dir, monkeypatch):
    """Every definitions-first prompt goes on after its preamble with "Report: ", whatever its
    report or sentence: one check for all of them, before the first call's texts are tokenized,
    so not even the first call tokenizes their preambles again."""
    engine = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir)))
    texts, heads = _definitions_first_prompts(engine)
    whole = engine.formatter.encode(texts)
    seen = _spy_encode(engine, monkeypatch)
    assert engine.formatter.encode_prompts(texts, heads) == whole
    assert len(engine.formatter._splits) == 1
    assert sum(t.startswith(heads[0]) for t in seen) == 1  # the check's whole text
    assert len(seen) == len(texts) + 2


def test_a_tokenizer_that_splits_the_preamble_otherwise_keeps_whole_prompts(tiny_model_dir,
                                                                            monkeypatch):
    engine = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir)))
    texts, heads = _definitions_first_prompts(engine)
    whole = engine.formatter.encode(texts)
    # As if the tokenizer merged the preamble's closing line break with what follows it.
    engine.formatter._preamble_tokens[heads[0]] = engine.formatter._preamble_tokens[heads[0]][:-1] + [7]
    seen = _spy_encode(engine, monkeypatch)
    engine.formatter.encode_prompts(texts, heads)
    assert set(engine.formatter._splits.values()) == {False}
    seen.clear()
    assert engine.formatter.encode_prompts(texts, heads) == whole
    assert seen == texts


def test_a_rendered_prompt_is_kept_for_the_second_ask(tiny_engine, monkeypatch):
    """The labeller's context check and the engine render each prompt: the template runs once."""
    formatter = tiny_engine.formatter
    calls, render = [], formatter.tokenizer.apply_chat_template
    monkeypatch.setattr(formatter.tokenizer, "apply_chat_template",
                        lambda *a, **kw: (calls.append(a), render(*a, **kw))[1])
    first = [{"role": "user", "content": "Is there a fracture? (cache test 1)"}]
    other = [{"role": "user", "content": "Is there a fracture? (cache test 2)"}]
    assert formatter.render(first) == formatter.render([dict(m) for m in first])
    assert len(calls) == 1
    assert formatter.render(other) != formatter.render(first) and len(calls) == 2
    odd = [{"role": "user", "content": "unhashable extra (cache test)", "tags": ["a"]}]
    assert formatter.render(odd) == formatter.render(odd) and len(calls) == 4
