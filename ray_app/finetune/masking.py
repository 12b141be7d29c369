"""Tokenisation with the loss mask built in, truncation that keeps the target, and a collator
that only pads.

The mask is made once, at tokenisation: `labels` is -100 on every prompt token and equals the
input id on every target token. The collator never rebuilds labels from input ids (the
reference code did, which loses the mask; and where the pad token is also the end-of-turn
token, deriving the mask from padding would drop the trained end-of-turn token too).

The loss is computed from the logits of the target positions only (`target_logits`): a
labeller example is ~200-500 prompt tokens for one or two target tokens, and projecting every
prompt position onto the vocabulary (152k columns for Qwen, upcast to fp32 for the loss) cost
Qwen-1.5B 18% of its training time and 1.6 GB at 4 examples a step
(benchmarks/bench_finetune.py --losses targets all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ray_app.engines.base import ChatFormatter
from ray_app.finetune.datasets import TextExample

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenisedExample:
    example_id: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class TargetTooLong(ValueError):
    """The target alone leaves no room for any prompt within `max_length`."""


def prompt_ids(tokenizer: Any, prompt: str | list[dict[str, str]],
               formatter: ChatFormatter | None = None) -> list[int]:
    """A chat prompt rendered exactly as the engines render it (assistant turn opened), or a
    plain-text prompt with the tokenizer's own special tokens (BOS where it has one)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    return (formatter or ChatFormatter(tokenizer)).token_ids(prompt)


def target_ids(tokenizer: Any, example: TextExample) -> list[int]:
    """The target's tokens, encoded on their own so that they are exactly the tokens the engine
    scores or generates after the prompt; plus the end-of-turn token when trained."""
    ids = tokenizer.encode(example.target, add_special_tokens=False)
    if example.end_turn:
        ids.append(end_turn_id(tokenizer))
    return ids


def end_turn_id(tokenizer: Any) -> int:
    """The token that ends the assistant's turn (ChatML's <|im_end|>, else EOS)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS "
                         "token to end a trained target with")
    return tokenizer.eos_token_id


def truncate_prompt(prompt: list[int], budget: int, head: int) -> list[int]:
    """`prompt` cut to `budget` tokens by dropping its middle: the first `head` tokens (chat
    template, instructions) and the end (the text next to the target, the question) stay."""
    if len(prompt) <= budget:
        return prompt
    head = min(head, budget // 2)
    return prompt[:head] + prompt[len(prompt) - (budget - head):]


def tokenise(tokenizer: Any, example: TextExample, max_length: int, head_tokens: int = 64,
             formatter: ChatFormatter | None = None) -> TokenisedExample:
    """input ids = prompt + target; labels = -100 on the prompt, the ids on the target.
    Raises TargetTooLong when the target does not fit with at least one prompt token."""
    prompt = prompt_ids(tokenizer, example.prompt, formatter)
    target = target_ids(tokenizer, example)
    budget = max_length - len(target)
    if budget < 1:
        raise TargetTooLong(f"example {example.example_id}: target of {len(target)} tokens "
                            f"does not fit max_length {max_length}")
    kept = truncate_prompt(prompt, budget, head_tokens)
    return TokenisedExample(example.example_id, kept + target,
                            [IGNORE_INDEX] * len(kept) + target, truncated=len(kept) < len(prompt))


def tokenise_all(tokenizer: Any, examples: Sequence[TextExample], max_length: int,
                 head_tokens: int = 64) -> tuple[list[TokenisedExample], dict[str, int]]:
    """Tokenised examples, and counts of truncated and dropped (target too long) ones."""
    out, counts = [], {"truncated": 0, "dropped_target_too_long": 0}
    chat = any(not isinstance(e.prompt, str) for e in examples)
    formatter = ChatFormatter(tokenizer) if chat else None  # built once: it probes the vocab
    for example in examples:
        try:
            tokenised = tokenise(tokenizer, example, max_length, head_tokens, formatter)
        except TargetTooLong:
            counts["dropped_target_too_long"] += 1
            continue
        counts["truncated"] += tokenised.truncated
        out.append(tokenised)
    return out, counts


def collate(batch: Sequence[TokenisedExample], pad_id: int,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input ids with `pad_id`, labels with -100, attention
    mask 0 on padding. Nothing else is touched."""
    width = max(len(e.input_ids) for e in batch)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose logits the loss uses: the logits at t predict token t + 1, so t is
    kept where labels[t + 1] is a target."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def target_logits(model: Any, batch: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [n, vocab], target ids [n], the kept-position mask) for the n target tokens
    of a collated batch, row by row. The model projects onto the vocabulary only the positions
    where some row has a target (transformers' `logits_to_keep` as 1-D positions, the form
    every transformers 5 release takes; the vLLM environment has an older one)."""
    keep = target_mask(batch["labels"])
    positions = keep.any(dim=0).nonzero().squeeze(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=positions).logits
    targets = batch["labels"][:, 1:][keep[:, :-1]]
    return logits[keep[:, positions]], targets, keep


def target_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens (what `labels=` computes in
    transformers, without the prompt positions' logits)."""
    logits, targets, _ = target_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.float(), targets)
