"""Prompt-lookup greedy decoding: the tokens of transformers' greedy `generate`, fewer passes."""

import pytest
import torch
from tiny_model import force_next_tokens
from transformers import RepetitionPenaltyLogitsProcessor

from ray_app.engines import EngineConfig, make_engine
from ray_app.engines.lookup_decoding import (
    LookupConfig,
    lookup_decode,
    penalise,
    propose,
)
from ray_app.labelling import prompts
from ray_app.labelling.conditions import load_condition

REPORTS = [
    "FINDINGS: Severe central canal stenosis at L4-L5.\nIMPRESSION: Severe stenosis.",
    "No stenosis. Normal alignment. Normal alignment of the lumbar spine. No fracture.",
    "CLINICAL HISTORY: ?mets.\nFINDINGS: Lytic lesion in L2 with epidural extension. "
    "Moderate stenosis at L1-L2 and L2-L3.\nIMPRESSION: Metastasis.",
]


def test_propose_follows_the_latest_earlier_ngram():
    # the last 2 tokens (7, 8) occurred at index 4: propose what followed them there
    assert propose([1, 7, 8, 2, 7, 8, 3, 4, 5, 7, 8], ngram=3, count=2) == [3, 4]
    assert propose([1, 2, 3, 9, 1, 2, 3], ngram=3, count=5) == [9, 1, 2, 3]
    assert propose([5, 1, 6, 1], ngram=3, count=4) == [6, 1]  # falls back to one token
    assert propose([1, 2, 3], ngram=3, count=4) == []  # nothing recurs
    assert propose([4], ngram=3, count=4) == []


def test_penalise_matches_transformers_processor():
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 3
    seen = torch.tensor([[3, 7, 7, 11, 49]])
    expected = RepetitionPenaltyLogitsProcessor(1.15)(seen, logits.clone())[0]
    got = penalise(logits[0], torch.tensor([3, 7, 11, 49]), 1.15)
    assert torch.equal(got, expected)
    assert not torch.equal(got, logits[0])


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir), max_new_tokens=24,
                                    repetition_penalty=1.15))


@pytest.fixture(scope="module")
def requests(engine):
    cancer = load_condition("spinal_cancer")
    return [engine.formatter.token_ids(prompts.summary_request_conversation(
        prompts.DEFAULT_TEMPLATE, cancer, r)) for r in REPORTS]


def hf_greedy(engine, ids: list[int]) -> list[int]:
    out = engine.model.generate(
        input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=engine.config.max_new_tokens, do_sample=False,
        repetition_penalty=engine.config.repetition_penalty, eos_token_id=engine.stop_ids,
        pad_token_id=engine.tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def decode(engine, batch, draft_tokens, prefill_rows=None):
    cfg = LookupConfig(engine.config.max_new_tokens, engine.stop_ids,
                       engine.config.repetition_penalty, draft_tokens)
    return lookup_decode(engine._forward, batch, engine.tokenizer.pad_token_id, cfg, engine.device,
                         prefill_rows=prefill_rows)


@pytest.mark.parametrize("draft_tokens", [0, 3, 8])
def test_lookup_decoding_is_greedy_decoding(engine, requests, draft_tokens):
    """Alone and batched with left padding, the tokens are transformers' greedy generate's."""
    expected = [hf_greedy(engine, ids) for ids in requests]
    assert len({len(ids) for ids in requests}) == 3  # the batch below is left-padded
    together = decode(engine, requests, draft_tokens)
    assert together.new_tokens == expected
    assert [decode(engine, [ids], draft_tokens).new_tokens[0] for ids in requests] == expected
    if draft_tokens == 0:
        assert together.forward_passes == engine.config.max_new_tokens


@pytest.mark.parametrize("prefill_rows", [1, 2])
def test_prompts_prefilled_in_chunks_decode_as_one_batch(engine, requests, prefill_rows):
    """Chunks' caches of different widths, left-padded into one: the same tokens."""
    expected = [hf_greedy(engine, ids) for ids in requests]
    decoded = decode(engine, requests, 3, prefill_rows)
    assert decoded.new_tokens == expected
    width = max(map(len, requests))
    assert [cols[: len(ids)] for cols, ids in zip(decoded.columns, requests)] == [
        list(range(width - len(ids), width)) for ids in requests]


def force_pattern(engine, pattern: list[int]):
    """Make the model continue `pattern` cyclically at every position (a report-like summary
    that repeats its own words), so that drafts are accepted."""
    following = {a: b for a, b in zip(pattern, pattern[1:] + pattern[:1])}

    return force_next_tokens(engine.model, lambda ids: ids.clone().apply_(
        lambda token: following.get(token, pattern[0])))


def test_accepted_drafts_save_passes_and_cache_columns_are_the_tokens(engine, requests):
    pattern = engine.tokenizer.encode(" canal stenosis at", add_special_tokens=False)
    handle = force_pattern(engine, pattern)
    try:
        plain = decode(engine, requests, 0)
        drafted = decode(engine, requests, 8)
        expected = [hf_greedy(engine, ids) for ids in requests]
    finally:
        handle.remove()
    assert drafted.new_tokens == plain.new_tokens == expected
    assert drafted.forward_passes <= plain.forward_passes // 3
    # the valid cache columns hold the prompt and the generated tokens, in order: all of them,
    # or all but the last when greedy chose it after the last forward pass
    for r, ids in enumerate(requests):
        new = drafted.new_tokens[r]
        assert drafted.tokens[r] in (ids + new, ids + new[:-1])
        assert len(drafted.columns[r]) == len(drafted.tokens[r])
        assert drafted.columns[r] == sorted(set(drafted.columns[r]))
    assert drafted.cache.get_seq_length() > max(c[-1] for c in drafted.columns)
