"""Yes/no scoring: p(yes) / (p(yes) + p(no)) at the answer position; with a third, unsure
answer that the wording offers ('maybe'), p(yes) / (p(yes) + p(no) + p(maybe)): a hedge then
counts against yes instead of being split between yes and no by the model's lean.

Tokenizers spell the answer several ways (`yes`, ` yes`, `Yes`, `▁Yes`). Every spelling that is
a single token counts: its probability mass is added to its side. Softmax over the selected
logits only equals renormalising the full softmax over them, so the score does not depend on
whether an engine returns raw logits or log-probabilities restricted to these ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

_SPELLINGS = {
    "yes": ("yes", "Yes", "YES"),
    "no": ("no", "No", "NO"),
}


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class AnswerTokenError(ValueError):
    """The tokenizer has no single-token spelling of 'yes' or 'no'."""


@dataclass(frozen=True)
class AnswerTokens:
    """Token ids that count as 'yes', as 'no' and (when the wording offers one) as the unsure
    answer, for one tokenizer."""

    yes_ids: tuple[int, ...]
    no_ids: tuple[int, ...]
    unsure_ids: tuple[int, ...] = ()

    @property
    def all_ids(self) -> list[int]:
        return [*self.yes_ids, *self.no_ids, *self.unsure_ids]

    @property
    def against_ids(self) -> list[int]:
        """The ids whose mass counts against yes: no, and the unsure answer."""
        return [*self.no_ids, *self.unsure_ids]


def answer_tokens(tokenizer: _Tokenizer, unsure: str = "") -> AnswerTokens:
    """Single-token spellings of yes/no (and of `unsure`, when given: as written, lower-case and
    capitalised), with and without a leading space."""
    spellings = dict(_SPELLINGS)
    if unsure:
        spellings[unsure] = tuple(dict.fromkeys((unsure, unsure.lower(), unsure.capitalize())))
    sides = {side: _single_token_ids(tokenizer, words) for side, words in spellings.items()}
    missing = [side for side, ids in sides.items() if not ids]
    if missing:
        raise AnswerTokenError(
            f"tokenizer {type(tokenizer).__name__} has no single-token spelling of {missing}; "
            "scoring needs one (use an instruct model with a standard vocabulary, and an unsure "
            "answer that is one word, such as 'maybe')"
        )
    seen: dict[int, str] = {}
    for side, ids in sides.items():
        for token in ids:
            if token in seen:
                raise AnswerTokenError(f"token id {token} spells both {seen[token]!r} and {side!r}")
            seen[token] = side
    return AnswerTokens(tuple(sides["yes"]), tuple(sides["no"]),
                        tuple(sides[unsure]) if unsure else ())


def _single_token_ids(tokenizer: _Tokenizer, words: Sequence[str]) -> list[int]:
    ids: list[int] = []
    for word in words:
        for spelling in (word, " " + word):
            encoded = tokenizer.encode(spelling, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
    return sorted(ids)


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def score_from_logits(logits: Sequence[float], tokens: AnswerTokens) -> float:
    """Score from one position's logits (or log-probabilities) over the whole vocabulary."""
    return score_from_token_logprobs({i: float(logits[i]) for i in tokens.all_ids}, tokens)


def score_from_token_logprobs(logprobs: Mapping[int, float], tokens: AnswerTokens) -> float:
    """Score from per-token logits/log-probabilities; ids not in `logprobs` have zero mass.
    `no` below is all the mass against yes (no and the unsure answer)."""
    yes = [logprobs[i] for i in tokens.yes_ids if i in logprobs and logprobs[i] > -math.inf]
    no = [logprobs[i] for i in tokens.against_ids if i in logprobs and logprobs[i] > -math.inf]
    if not yes:
        return 0.0
    if not no:
        return 1.0
    log_yes, log_no = _logsumexp(yes), _logsumexp(no)
    # p_yes / (p_yes + p_against) = sigmoid(log_yes - log_no), computed without overflow.
    diff = log_yes - log_no
    if diff >= 0:
        return 1.0 / (1.0 + math.exp(-diff))
    return math.exp(diff) / (1.0 + math.exp(diff))
