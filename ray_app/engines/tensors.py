"""Tensor helpers shared by the transformers engine, its decoder and fine-tuning's evaluation:
padding with the positions generate() would use, and the yes/no score of a batch of logits
(the vectorised form of ray_app.labelling.scoring.score_from_logits, which tests hold it to)."""

from __future__ import annotations

import torch

from ray_app.labelling.scoring import AnswerTokens


def yes_scores(last_logits: torch.Tensor, tokens: AnswerTokens) -> torch.Tensor:
    """Vectorised p(yes)/(p(yes)+p(no)) for a [batch, vocab] tensor of logits."""
    logits = last_logits.float()
    log_yes = torch.logsumexp(logits[:, list(tokens.yes_ids)], dim=-1)
    log_no = torch.logsumexp(logits[:, list(tokens.no_ids)], dim=-1)
    return torch.sigmoid(log_yes - log_no)


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
