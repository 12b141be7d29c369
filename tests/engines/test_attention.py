"""The CPU attention of the transformers engine (ray_app/engines/attention.py): grouped-query
attention without copied keys gives transformers' own sdpa numbers, masks and caches included."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ray_app.engines.attention import NAME, cpu_attention
from ray_app.engines.tensors import left_pad, left_padded_positions, returned_cache


@pytest.fixture(scope="module")
def models():
    """One tiny random grouped-query model (4 query heads share 2 key/value heads), loaded with
    transformers' sdpa and with ours."""
    assert cpu_attention() == NAME
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    loaded = {}
    for attention in ("sdpa", NAME):
        torch.manual_seed(0)  # the same weights
        model = LlamaForCausalLM(copy.deepcopy(config)).eval()
        model.set_attn_implementation(attention)
        assert model.config._attn_implementation == attention
        loaded[attention] = model
    return loaded


def _logits(model, rows, prefix_rows=None):
    """Logits of left-padded `rows`, run alone or on the KV cache of left-padded
    `prefix_rows` (the padding then sits inside the sequence, as in the engine's passes)."""
    with torch.inference_mode():
        cache, start, cache_mask = None, 0, None
        if prefix_rows:
            ids, mask = left_pad(prefix_rows, 0, "cpu")
            cache = returned_cache(model(input_ids=ids, attention_mask=mask,
                                         position_ids=left_padded_positions(mask)))
            start, cache_mask = mask.sum(1, keepdim=True), mask
        ids, mask = left_pad(rows, 0, "cpu")
        positions = start + left_padded_positions(mask)
        if cache_mask is not None:
            mask = torch.cat([cache_mask, mask], dim=1)
        cache_argument = ("cache" if "cache" in inspect.signature(model.forward).parameters
                          else "past_key_values")  # renamed in transformers 5.24
        return model(input_ids=ids, attention_mask=mask, position_ids=positions,
                     **{cache_argument: cache or DynamicCache()}).logits


def test_grouped_query_attention_without_copies_matches_sdpa(models):
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    prefixes = [[20, 21, 22, 23, 24], [25, 26], [27, 28, 29, 30]]
    for args in ((rows,), (rows, prefixes), ([[3]] * 3, prefixes)):
        expected = _logits(models["sdpa"], *args)
        got = _logits(models[NAME], *args)
        assert torch.allclose(got, expected, atol=1e-5)
    assert _logits(models[NAME], rows).std() > 0.01, "logits too flat to tell models apart"


def test_the_engine_loads_its_cpu_model_with_it(tiny_engine):
    assert tiny_engine.model.config._attn_implementation == NAME
