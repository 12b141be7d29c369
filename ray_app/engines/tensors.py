"""Tensor helpers shared by the transformers engine, its decoder and fine-tuning's evaluation:
padding with the positions generate() would use, and the yes/no score of a batch of logits
(the vectorised form of ray_app.labelling.scoring.score_from_logits, which tests hold it to)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ray_app.labelling.scoring import AnswerTokens


def yes_scores(logits: torch.Tensor, tokens: AnswerTokens) -> torch.Tensor:
    """Vectorised p(yes)/(p(yes)+p(no)[+p(unsure)]) for logits [..., vocab] -> [...]. The
    answer tokens' columns are taken before anything else: converting or copying a whole
    vocabulary per answer (Qwen: 152k) cost more than the rest of a pass when the model's own
    work is small (a GPU; benchmarks/bench_conditions.py on a tiny model)."""
    ids = torch.tensor(tokens.all_ids, device=logits.device)
    picked = logits.index_select(-1, ids).float()
    yes = len(tokens.yes_ids)
    log_yes = torch.logsumexp(picked[..., :yes], dim=-1)
    log_against = torch.logsumexp(picked[..., yes:], dim=-1)  # no, and the unsure answer
    return torch.sigmoid(log_yes - log_against)


def row_scores(logits: torch.Tensor, answers: Sequence[AnswerTokens],
               at: tuple[torch.Tensor, ...] | None = None) -> list[float]:
    """yes_scores of logits [..., vocab], each answer with its own answer tokens (a call may
    mix wordings with and without an unsure answer). Answer r is at logits[r], or, with `at`
    (index tensors into the leading dimensions), at logits[at][r]. The answer columns are taken
    over all positions first, once per distinct set, and indexed after: indexing the logits
    first would copy a whole vocabulary per answer (yes_scores)."""
    scores = [0.0] * len(answers)
    for tokens in set(answers):
        values = yes_scores(logits, tokens)
        values = (values[at] if at is not None else values).tolist()
        for r, row_tokens in enumerate(answers):
            if row_tokens == tokens:
                scores[r] = values[r]
    return scores


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the left to the longest row, and the mask of real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def right_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the right to the longest row (rows may be empty), and their mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as generate() computes them; without this, padded
    rows see shifted positions and score differently from unpadded ones."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def returned_cache(output):
    """The KV cache a forward pass returned: `output.cache` from transformers 5.24 on (reading
    the old `past_key_values` name warns), `past_key_values` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@dataclass(frozen=True)
class PackedRows:
    """Rows that each hold one shared prefix and, after it, several suffixes that continue it
    apart. The prefix is left-padded to the widest; then comes one slot per suffix index, as
    wide as its longest suffix, each suffix right-aligned in its slot, so that slot j ends at
    the same column in every row and one `logits_to_keep` list reaches every suffix's end."""

    ids: torch.Tensor  # [rows, width]
    real: torch.Tensor  # [rows, width], bool: not padding
    positions: torch.Tensor  # [rows, width]: 0 at each prefix's first token
    segments: torch.Tensor  # [width]: 0 in the prefix, j + 1 in slot j
    ends: torch.Tensor  # [slots]: the column of each slot's last token


def pack_rows(prefixes: list[list[int]], suffixes: list[list[list[int]]], pad: int,
              device) -> PackedRows:
    """Pack each prefix with its suffixes (each suffix non-empty) into one row."""
    width = max(len(p) for p in prefixes)
    slot_widths = [max(len(own[j]) for own in suffixes if j < len(own))
                   for j in range(max(len(own) for own in suffixes))]
    ids, real, positions = [], [], []
    for prefix, own in zip(prefixes, suffixes):
        lead = width - len(prefix)
        row_ids, row_real = [pad] * lead + prefix, [False] * lead + [True] * len(prefix)
        row_positions = [0] * lead + list(range(len(prefix)))
        for j, slot in enumerate(slot_widths):
            suffix = own[j] if j < len(own) else []
            gap = slot - len(suffix)
            row_ids += [pad] * gap + suffix
            row_real += [False] * gap + [True] * len(suffix)
            row_positions += [0] * gap + list(range(len(prefix), len(prefix) + len(suffix)))
        ids.append(row_ids)
        real.append(row_real)
        positions.append(row_positions)
    segments = [0] * width + [j + 1 for j, slot in enumerate(slot_widths) for _ in range(slot)]
    ends, column = [], width - 1
    for slot in slot_widths:
        column += slot
        ends.append(column)
    return PackedRows(
        torch.tensor(ids, device=device), torch.tensor(real, device=device),
        torch.tensor(positions, device=device), torch.tensor(segments, device=device),
        torch.tensor(ends, device=device))


def packed_attention_mask(rows: PackedRows, cached: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive 4-D mask [rows, 1, width, cached + width] of packed rows that continue
    `cached` tokens every row sees (a preamble; 0: none): a prefix token sees the prefix up to
    itself, a suffix token the whole prefix and its own suffix up to itself, never another
    suffix; padding sees only itself (a query that sees nothing would make NaN). Additive
    rather than boolean: eager attention adds the mask to its scores, SDPA takes either."""
    width = rows.segments.shape[0]
    column = torch.arange(width, device=rows.ids.device)
    segments = rows.segments
    visible = (column[None, :] <= column[:, None]) & (
        (segments[None, :] == 0) | (segments[None, :] == segments[:, None]))
    allowed = visible[None] & rows.real[:, None, :] & rows.real[:, :, None]
    allowed |= torch.eye(width, dtype=torch.bool, device=column.device)[None]
    allowed = torch.cat([allowed.new_ones(len(allowed), width, cached), allowed], dim=2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=column.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
