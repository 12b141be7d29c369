"""Batched greedy decoding: the tokens of transformers' greedy `generate`, and a KV cache whose
columns say which tokens they hold."""

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from ray_app.engines import EngineConfig, make_engine
from ray_app.engines.batched_decoding import DecodeConfig, greedy_decode, penalise
from ray_app.labelling import prompts
from ray_app.labelling.conditions import load_condition

REPORTS = [
    "FINDINGS: Severe central canal stenosis at L4-L5.\nIMPRESSION: Severe stenosis.",
    "No stenosis. Normal alignment. Normal alignment of the lumbar spine. No fracture.",
    "CLINICAL HISTORY: ?mets.\nFINDINGS: Lytic lesion in L2 with epidural extension. "
    "Moderate stenosis at L1-L2 and L2-L3.\nIMPRESSION: Metastasis.",
]


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
        input_ids=torch.tensor([ids], device=engine.device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=engine.device),
        max_new_tokens=engine.config.max_new_tokens, do_sample=False,
        repetition_penalty=engine.config.repetition_penalty, eos_token_id=engine.stop_ids,
        pad_token_id=engine.tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def decode(engine, batch, prefill_rows=None):
    cfg = DecodeConfig(engine.config.max_new_tokens, engine.stop_ids,
                       engine.config.repetition_penalty)
    return greedy_decode(engine._forward, batch, engine.tokenizer.pad_token_id, cfg, engine.device,
                         prefill_rows=prefill_rows)


def test_batched_decoding_is_greedy_decoding(engine, requests):
    """Alone and batched with left padding, the tokens are transformers' greedy generate's."""
    expected = [hf_greedy(engine, ids) for ids in requests]
    assert len({len(ids) for ids in requests}) == 3  # the batch below is left-padded
    together = decode(engine, requests)
    assert together.new_tokens == expected
    assert [decode(engine, [ids]).new_tokens[0] for ids in requests] == expected
    assert together.forward_passes == engine.config.max_new_tokens


@pytest.mark.parametrize("prefill_rows", [1, 2])
def test_prompts_prefilled_in_chunks_decode_as_one_batch(engine, requests, prefill_rows):
    """Chunks' caches of different widths, left-padded into one: the same tokens."""
    expected = [hf_greedy(engine, ids) for ids in requests]
    decoded = decode(engine, requests, prefill_rows)
    assert decoded.new_tokens == expected
    width = max(map(len, requests))
    assert [cols[: len(ids)] for cols, ids in zip(decoded.columns, requests)] == [
        list(range(width - len(ids), width)) for ids in requests]


def test_cache_columns_are_the_tokens(engine, requests):
    """The valid cache columns hold the prompt and the generated tokens, in order: all but the
    last, which greedy chose after the last forward pass (a finished row feeds nothing)."""
    decoded = decode(engine, requests)
    for r, ids in enumerate(requests):
        new = decoded.new_tokens[r]
        assert decoded.tokens[r] == ids + new[:-1]
        assert len(decoded.columns[r]) == len(decoded.tokens[r])
        assert decoded.columns[r] == sorted(set(decoded.columns[r]))
        assert decoded.mask[r, decoded.columns[r]].all()
        assert int(decoded.mask[r].sum()) == len(decoded.columns[r])  # the rest is masked
    assert decoded.cache.get_seq_length() > max(c[-1] for c in decoded.columns)


def test_configs_that_still_set_draft_tokens_load_and_ignore_it(caplog):
    """Prompt-lookup drafts are gone (they never changed the output): a serve file or config
    written with `draft_tokens` still loads, with a warning."""
    with caplog.at_level("WARNING"):
        cfg = EngineConfig.from_dict({"model": "m", "draft_tokens": 8})
    assert cfg == EngineConfig(model="m") and not hasattr(cfg, "draft_tokens")
    assert "'draft_tokens' is no longer used and is ignored" in caplog.text
    with pytest.raises(ValueError, match=r"unknown engine setting\(s\) \['draft_tokenz'\]"):
        EngineConfig.from_dict({"draft_tokenz": 8})
