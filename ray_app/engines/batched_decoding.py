"""Batched greedy decoding that leaves a KV cache the caller can keep using (plain torch, no
Ray).

Our own loop rather than transformers' `generate` (measured the same speed on CPU) because it
leaves a KV cache whose every row says which columns hold which of its tokens: the labeller
scores its follow-up questions on it (see TransformersEngine.generate_then_score). The tokens
are greedy `generate`'s, repetition penalty included.

Rows of a batch end at different steps, and callers may drop a row's newest tokens, so the KV
cache gets holes: columns of rows already finished (and of dropped tokens) stay in the cache,
masked out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ray_app.engines.tensors import (
    left_pad,
    left_padded_positions,
    returned_cache,
    right_pad,
)

Forward = Callable[..., Any]  # (input_ids, mask, positions, cache=None, logits_to_keep=1) -> output


@dataclass
class DecodeConfig:
    max_new_tokens: int
    stop_ids: Sequence[int]
    repetition_penalty: float = 1.0


@dataclass
class DecodedBatch:
    """A batch's KV cache and, per row, which of its columns hold which of the row's tokens."""

    cache: Any
    mask: torch.Tensor  # [rows, cache columns]: 1 where a column holds one of the row's tokens
    columns: list[list[int]]  # per row: the cache columns of its tokens, in order
    tokens: list[list[int]]  # per row: the token in each of those columns
    new_tokens: list[list[int]]  # per row: generated tokens, the stop token included
    forward_passes: int = 1  # counts the prefill as one

    def feed(self, forward: Forward, feeds: list[list[int]], pad_id: int,
             logits_to_keep: int = 0) -> torch.Tensor:
        """Run each row's `feeds` (right-padded; some rows may have none) on the cache; they
        become the row's newest tokens. Returns the logits [rows, widest feed, vocab] (or of
        the last `logits_to_keep` positions)."""
        start = self.mask.shape[1]
        ids, step_mask = right_pad(feeds, pad_id, self.mask.device)
        positions = torch.tensor([[len(cols) + j for j in range(ids.shape[1])]
                                  for cols in self.columns], device=self.mask.device)
        self.mask = torch.cat([self.mask, step_mask], dim=1)
        logits = forward(ids, self.mask, positions, cache=self.cache,
                         logits_to_keep=logits_to_keep).logits
        self.forward_passes += 1
        for cols, toks, fed in zip(self.columns, self.tokens, feeds):
            cols.extend(range(start, start + len(fed)))
            toks.extend(fed)
        return logits

    def drop_newest(self, row: int, count: int) -> None:
        """Forget the row's `count` newest tokens: their columns are masked."""
        if count:
            self.mask[row, self.columns[row][-count:]] = 0
            del self.columns[row][-count:], self.tokens[row][-count:]


def penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL repetition penalty as transformers applies it: logits of tokens already in the
    sequence are divided by `penalty` when positive and multiplied by it when negative."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    out = logits.clone()
    values = out[seen]
    out[seen] = torch.where(values < 0, values * penalty, values / penalty)
    return out


class _Row:
    """One sequence's greedy choices, and the tokens it has seen (for the penalty)."""

    def __init__(self, prompt: list[int], cfg: DecodeConfig):
        self.cfg = cfg
        self.new: list[int] = []
        self.seen = set(prompt)
        self.done = False

    def choose(self, logits: torch.Tensor) -> int:
        """Greedy's next token (after the penalty); the row ends at a stop token or at the
        token budget."""
        if self.cfg.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(self.seen), dtype=torch.long, device=logits.device)
            logits = penalise(logits.float(), seen, self.cfg.repetition_penalty)
        token = int(logits.argmax())
        self.new.append(token)
        self.seen.add(token)
        self.done = token in self.cfg.stop_ids or len(self.new) >= self.cfg.max_new_tokens
        return token


@torch.inference_mode()
def greedy_decode(forward: Forward, prompts: list[list[int]], pad_id: int, cfg: DecodeConfig,
                  device: torch.device, prefill_rows: int | None = None,
                  new_cache: Callable[[], Any] | None = None) -> DecodedBatch:
    """Greedy continuations of `prompts` (token ids), decoded as one batch, one token per row
    per forward pass. The prompts are run in chunks of `prefill_rows` consecutive prompts (pass
    them sorted by length): prefill is compute-bound, so small chunks cost nothing and waste
    little on left padding, while decoding gains from a wide batch (2 CPU cores, SmolLM2: 10.1
    ms per row and step at 8 rows, 6.1 at 16, 5.4 at 32). `new_cache` makes the empty KV cache
    the chunks are merged into (the model's DynamicCache)."""
    batch, last_logits = _prefill(forward, prompts, pad_id, device, prefill_rows or len(prompts),
                                  new_cache)
    rows = [_Row(p, cfg) for p in prompts]
    batch.new_tokens = [row.new for row in rows]
    pending = [row.choose(last_logits[r]) for r, row in enumerate(rows)]
    while not all(row.done for row in rows):
        # a finished row feeds nothing: its new column is masked out
        feeds = [[] if row.done else [pending[r]] for r, row in enumerate(rows)]
        logits = batch.feed(forward, feeds, pad_id, logits_to_keep=1)
        for r, row in enumerate(rows):
            if feeds[r]:
                pending[r] = row.choose(logits[r, -1])
    return batch


def _prefill(forward: Forward, prompts: list[list[int]], pad_id: int, device: torch.device,
             chunk_rows: int, new_cache) -> tuple[DecodedBatch, torch.Tensor]:
    """Every prompt run, in chunks, into one left-padded cache; the logits after each prompt."""
    width = max(len(p) for p in prompts)
    caches, last_logits = [], []
    for start in range(0, len(prompts), chunk_rows):
        ids, mask = left_pad(prompts[start : start + chunk_rows], pad_id, device)
        out = forward(ids, mask, left_padded_positions(mask))
        caches.append((returned_cache(out), width - ids.shape[1]))
        last_logits.append(out.logits[:, -1])
    _, mask = left_pad(prompts, pad_id, device)
    return DecodedBatch(_left_padded_cache(caches, new_cache), mask,
                        [list(range(width - len(p), width)) for p in prompts],
                        [list(p) for p in prompts], []), torch.cat(last_logits)


def _left_padded_cache(caches: list[tuple[Any, int]], new_cache) -> Any:
    """One cache from the chunks' caches, each left-padded (zeros, masked) to the widest."""
    if len(caches) == 1 and caches[0][1] == 0:
        return caches[0][0]
    if new_cache is None:
        from transformers import DynamicCache as new_cache
    merged = new_cache()
    for index in range(len(caches[0][0].layers)):
        keys = [F.pad(c.layers[index].keys, (0, 0, pad, 0)) for c, pad in caches]
        values = [F.pad(c.layers[index].values, (0, 0, pad, 0)) for c, pad in caches]
        merged.update(torch.cat(keys), torch.cat(values), index)
    return merged
