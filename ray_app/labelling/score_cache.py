"""Scores of questions already asked, so that a question asked again is not recomputed.

Asked sentence by sentence, an archive repeats itself: "No pneumothorax.", "Heart size is
normal." come back in report after report (Open-i development reports: 35% of the sentences of
185 reports are repeats, 50% of 778, 60% of 2,979), and every repeat is the same prompt. A
question is the whole conversation the engine scores (wording, definitions, condition, level,
sentence or report), so an entry is only ever reused for exactly the prompt it was computed
for, by the engine (model, adapter) the cache belongs to. Plain Python: a Labeller holds one.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Callable, Sequence

from ray_app.labelling.prompts import Conversation

# ~100 bytes an entry (a 16-byte digest, a float, the dict's own): 200,000 take ~20 MB per
# engine actor, more than the distinct questions of a 3,000-report archive by sentence.
DEFAULT_ENTRIES = 200_000

Scorer = Callable[[list[Conversation]], list[float]]


def question_key(conversation: Conversation) -> bytes:
    """A digest of everything in the conversation (a collision is as likely as a 128-bit
    hash's)."""
    text = json.dumps(conversation, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class ScoreCache:
    """The most recently used `max_entries` scores, by question; 0 entries: nothing is kept
    (every question of a call is still asked once)."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES):
        if max_entries < 0:
            raise ValueError(f"a score cache holds 0 or more entries, not {max_entries}")
        self.max_entries = max_entries
        self._scores: OrderedDict[bytes, float] = OrderedDict()
        self.questions = 0  # asked of the cache
        self.remembered = 0  # answered without the engine (earlier calls or earlier in a call)

    def score(self, conversations: Sequence[Conversation], engine_score: Scorer) -> list[float]:
        """Each conversation's score, in order. The engine is asked once, about the questions
        neither remembered nor repeated in this call, in their order of first appearance (the
        order that lets it share a report's prefix)."""
        keys = [question_key(c) for c in conversations]
        known: dict[bytes, float] = {}
        new: dict[bytes, Conversation] = {}
        for key, conversation in zip(keys, conversations):
            if key in known or key in new:
                continue
            if key in self._scores:
                self._scores.move_to_end(key)
                known[key] = self._scores[key]
            else:
                new[key] = conversation
        if new:
            known.update(zip(new, engine_score(list(new.values()))))
            for key in new:
                self._keep(key, known[key])
        self.questions += len(keys)
        self.remembered += len(keys) - len(new)
        return [known[key] for key in keys]

    def _keep(self, key: bytes, score: float) -> None:
        if self.max_entries == 0:
            return
        self._scores[key] = score
        if len(self._scores) > self.max_entries:
            self._scores.popitem(last=False)

    def __len__(self) -> int:
        return len(self._scores)
