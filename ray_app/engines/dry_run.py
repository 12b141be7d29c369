"""A model-free engine for checking a pipeline's plumbing (I/O, resumption, errors) at full
speed: scores are a deterministic hash of the prompt, not a diagnosis. Never use its labels."""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

from ray_app.engines.base import Engine, EngineConfig, Generation, model_identity
from ray_app.labelling.prompts import Conversation


class DryRunEngine(Engine):
    name = "dry-run"

    def __init__(self, config: EngineConfig):
        super().__init__(config)

    @property
    def model_id(self) -> str:
        return dry_run_identity(self.config)

    def count_tokens(self, conversation: Conversation) -> int:
        # About four characters a token in English clinical text.
        return sum(len(m["content"]) for m in conversation) // 4 + 8 * len(conversation)

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        return [_unit_hash(c) for c in conversations]

    def generate(self, conversations: Sequence[Conversation]) -> list[Generation]:
        return [Generation(f"dry-run summary {_unit_hash(c):.6f}", self.count_tokens(c))
                for c in conversations]


def dry_run_identity(config: EngineConfig) -> str:
    """Marked so that hash scores can never be mixed with, or resumed into, a model's."""
    return "dry-run:" + model_identity(config)


def _unit_hash(conversation: Conversation) -> float:
    digest = hashlib.blake2b(json.dumps(conversation).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
