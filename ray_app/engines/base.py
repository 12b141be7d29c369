"""One engine interface for every backend, and the config that picks one.

An engine turns chat conversations into yes/no scores and into generated text. Both built-in
engines render conversations to token ids with the same chat formatter, so the same model gives
the same scores through either (within numerical tolerance).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Sequence

from ray_app.labelling.prompts import Conversation
from ray_app.labelling.scoring import AnswerTokens, answer_tokens

log = logging.getLogger(__name__)

# End-of-turn markers of common chat templates: generation stops at any of them.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")


@dataclass
class EngineConfig:
    """How to load and run the model. Every field can be set from the job's YAML or CLI."""

    #: settings that are gone: configs, serve files and calibrations that still hold them load,
    #: with a warning, and the value is ignored (ray_app.pipeline.config_cli honours it too)
    RETIRED_SETTINGS: ClassVar[dict[str, str]] = {
        "draft_tokens": "prompt-lookup drafts were removed: they never changed the output and "
                        "made summaries slower where measured (2 CPU cores, SmolLM2)",
    }

    engine: str = field(
        default="transformers",
        metadata={"doc": "'transformers', 'vllm', or 'package.module:Class' for your own."},
    )
    model: str = field(
        default="qwen2.5-coder-1.5b-instruct",
        metadata={"doc": "A pip-installed model name, a Hugging Face folder, or a .gguf file."},
    )
    dtype: str = field(
        default="auto",
        metadata={"doc": "'float32', 'bfloat16', 'float16' or 'auto': bf16 on a GPU or a CPU with "
                  "native bf16 (AVX512-BF16/AMX), fp32 elsewhere; float32 for scores that do "
                  "not move with batch composition."},
    )
    device: str = field(default="auto", metadata={"doc": "'auto', 'cpu' or 'cuda'."})
    batch_size: int = field(
        default=8,
        metadata={"doc": "Rows per scoring forward pass: a prompt, or (transformers) the prompts "
                  "of one report that share a prefix, packed into one row."},
    )
    generate_batch_size: int = field(
        default=32,
        metadata={"doc": "transformers: summaries decoded together (prompts are prefilled "
                  "batch_size at a time, by length). 2 CPU cores, SmolLM2, 64 reports: 2.53 "
                  "s/report at 16, 2.22 at 32."},
    )
    max_context_tokens: int = field(
        default=4096,
        metadata={"doc": "Prompt + answer budget; longer reports are shortened and flagged."},
    )
    min_shared_prefix: int = field(
        default=32,
        metadata={"doc": "transformers: run a prefix this long shared by consecutive prompts once."},
    )
    max_new_tokens: int = field(default=256, metadata={"doc": "Longest summary generated."})
    repetition_penalty: float = field(
        default=1.0, metadata={"doc": "Summary decoding (greedy); the reference used 1.15."}
    )
    cpu_threads: int | None = field(
        default=None, metadata={"doc": "torch threads on CPU; None = all cores of the process."}
    )
    adapter: str | None = field(default=None, metadata={"doc": "Folder of a peft LoRA adapter."})
    merge_adapter: bool = field(
        default=True,
        metadata={"doc": "transformers: fold the adapter into the base weights at load (about "
                         "2x faster on CPU; in bf16 the sums round); false keeps LoRA layers."},
    )
    tensor_parallel_size: int = field(default=1, metadata={"doc": "vLLM: GPUs per engine."})
    enable_prefix_caching: bool = field(default=True, metadata={"doc": "vLLM: reuse prompt KV."})
    gpu_memory_utilization: float = field(default=0.85, metadata={"doc": "vLLM: GPU share."})
    engine_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"doc": "Extra keyword arguments for the backend."}
    )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineConfig":
        retired = sorted(set(data) & set(cls.RETIRED_SETTINGS))
        for name in retired:
            log.warning("engine setting '%s' is no longer used and is ignored: %s", name,
                        cls.RETIRED_SETTINGS[name])
        data = {k: v for k, v in data.items() if k not in retired}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown engine setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


# follow_ups(index of the request, its completion) -> the conversations to score after it
FollowUps = Callable[[int, str], Sequence[Conversation]]


def split_by_lengths(flat: Sequence[float], lengths: Sequence[int]) -> list[list[float]]:
    """[a, b, c, d], [1, 3] -> [[a], [b, c, d]]"""
    out, start = [], 0
    for n in lengths:
        out.append(list(flat[start : start + n]))
        start += n
    return out


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int


#: Tokens a tokenizer may make beyond one per UTF-8 byte of a rendered prompt. A byte-level BPE
#: (Qwen, SmolLM2, Llama 3) makes at most one token per byte, each token covering one or more;
#: a SentencePiece tokenizer may add a word-start piece to each stretch between special tokens.
_UNCOUNTED_TOKENS = 64


def _split_key(head: str, text: str) -> tuple[str, str] | None:
    """What decides whether `text` tokenizes as its preamble `head`'s tokens and then its own:
    the preamble and what follows it up to and including its first non-space character (a
    tokenizer's split at the preamble's closing line break depends on that, no further: a
    pre-tokenizer's pattern looks ahead across spaces only, and from that character on it reads
    the rest as it would alone). None when no non-space character comes within
    _SPLIT_LOOKAHEAD characters: such a text is tokenized whole."""
    after = text[len(head) : len(head) + _SPLIT_LOOKAHEAD]
    rest = after.lstrip()
    return (head, after[: len(after) - len(rest) + 1]) if rest else None


#: Characters after a preamble searched for its first non-space one (_split_key).
_SPLIT_LOOKAHEAD = 16
#: (preamble, start) pairs checked per formatter; past this, new ones are tokenized whole.
_KEPT_SPLITS = 4096

#: Rendered prompts a ChatFormatter keeps (a label call's questions are rendered twice).
_KEPT_RENDERS = 8192


def _conversation_key(conversation: Conversation) -> tuple | None:
    """A hashable copy of the messages (None if a message holds something unhashable)."""
    try:
        key = tuple(tuple(sorted(message.items())) for message in conversation)
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


class ChatFormatter:
    """Renders conversations through the tokenizer's own chat template to token ids."""

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat "
                "template; use an instruct/chat model"
            )
        self.tokenizer = tokenizer
        self.answer_tokens: AnswerTokens = answer_tokens(tokenizer)
        self._unsure_tokens: dict[str, AnswerTokens] = {}
        self._rendered: dict[tuple, str] = {}
        self._preamble_tokens: dict[str, list[int]] = {}
        # (preamble text, what follows it) -> whether the two tokenize apart as one
        self._splits: dict[tuple[str, str], bool] = {}

    def answers(self, conversation: Conversation) -> AnswerTokens:
        """The answer tokens that score this conversation: yes/no, plus the unsure answer its
        scored turn offers (prompts._asked)."""
        unsure = conversation[-1].get("unsure", "") if conversation else ""
        if not unsure:
            return self.answer_tokens
        if unsure not in self._unsure_tokens:
            self._unsure_tokens[unsure] = answer_tokens(self.tokenizer, unsure)
        return self._unsure_tokens[unsure]

    def render(self, conversation: Conversation) -> str:
        """The conversation through the chat template. The labeller asks for each prompt twice
        (its context check, then the engine), and the template (~85 us a prompt) was the
        largest part of the engine's own time left where the model's is small (a GPU), so the
        last few thousand renders are kept, keyed by the messages themselves."""
        key = _conversation_key(conversation)
        text = self._rendered.get(key) if key is not None else None
        if text is None:
            text = self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
            if key is not None:
                if len(self._rendered) >= _KEPT_RENDERS:
                    self._rendered.clear()
                self._rendered[key] = text
        return text

    def preamble_head(self, conversation: Conversation, text: str) -> str:
        """The rendered text of the conversation's preamble ("" if it has none): what the
        template puts before the system message, then the message's first `preamble` chars."""
        first = conversation[0] if conversation else {}
        chars = first.get("preamble", 0)
        start = text.find(first.get("content", "")) if chars else -1
        if start < 0:
            return ""
        head = text[: start + chars]
        if head not in self._preamble_tokens:
            self._preamble_tokens[head] = self.tokenizer.encode(head, add_special_tokens=False)
        return head

    def encode_prompts(self, texts: list[str], heads: list[str]) -> list[list[int]]:
        """Token ids of the rendered texts (`heads`: their preamble_head), in one tokenizer
        call. A text with a preamble is tokenized after it (the preamble's tokens are kept) once
        a text with the same preamble and the same first non-space character after it
        (_split_key; checked before the call's texts are tokenized) has shown that tokenizing
        the two apart gives its whole tokens: a definitions-first prompt is ~500 preamble tokens and
        ~20-150 of its own, and tokenizing every preamble again was the largest part of the
        engine's own time where the model's is small (a GPU). The preamble ends with a line
        break, which byte-level BPE tokenizers (Qwen, SmolLM2, Llama 3) never merge across, and
        their splitting looks only ahead, so the check holds for every text with that start; a
        tokenizer that merges across it or adds a word-start piece fails the check and keeps
        tokenizing whole texts."""
        keys = [_split_key(h, t) if h else None for h, t in zip(heads, texts)]
        self._check_splits(texts, heads, keys)
        split = [key is not None and self._splits.get(key) is True for key in keys]
        ids = self.encode([t[len(h):] if s else t for t, h, s in zip(texts, heads, split)])
        return [self._preamble_tokens[h] + i if s else i for i, h, s in zip(ids, heads, split)]

    def _check_splits(self, texts: list[str], heads: list[str], keys: list) -> None:
        """For each key not seen before, whether its first text tokenizes whole as its
        preamble's tokens and then its own: one tokenizer call for all of them."""
        first: dict[tuple[str, str], int] = {}
        for i, key in enumerate(keys):
            if key is not None and key not in self._splits and key not in first:
                if len(self._splits) + len(first) >= _KEPT_SPLITS:
                    break
                first[key] = i
        if not first:
            return
        picked = list(first.values())
        ids = self.encode([texts[i] for i in picked] + [texts[i][len(heads[i]):] for i in picked])
        for n, (key, i) in enumerate(first.items()):
            self._splits[key] = ids[n] == self._preamble_tokens[heads[i]] + ids[len(picked) + n]

    def preamble_ids(self, head: str) -> list[int]:
        """The tokens of a preamble that preamble_head returned."""
        return self._preamble_tokens[head]

    def encode_conversations(self, conversations: Sequence[Conversation]
                             ) -> tuple[list[str], list[list[int]]]:
        """(preamble heads, token ids) of the conversations' prompts (encode_prompts)."""
        texts = [self.render(c) for c in conversations]
        heads = [self.preamble_head(c, t) for c, t in zip(conversations, texts)]
        return heads, self.encode_prompts(texts, heads)

    def prompt_ids(self, conversations: Sequence[Conversation]) -> list[list[int]]:
        """Token ids of each conversation's prompt (encode_prompts)."""
        return self.encode_conversations(conversations)[1]

    def token_ids(self, conversation: Conversation) -> list[int]:
        return self.encode([self.render(conversation)])[0]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of rendered texts, in one call: a fast tokenizer encodes a batch on all
        cores, where text by text it uses one (on a GPU machine the engine's time went mostly
        to tokenizing: benchmarks/bench_conditions.py in the README)."""
        if not texts:
            return []
        # Rendered text already holds the template's special tokens: do not add them twice.
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def count_tokens(self, conversation: Conversation) -> int:
        return len(self.token_ids(conversation))

    def fits(self, conversation: Conversation, tokens: int) -> bool:
        """Whether the prompt takes at most `tokens` tokens, without tokenizing it when its
        UTF-8 bytes already say so (the labeller asks this of every report and condition)."""
        text = self.render(conversation)
        if len(text.encode("utf-8")) + _UNCOUNTED_TOKENS <= tokens:
            return True
        return len(self.encode([text])[0]) <= tokens

    def stop_token_ids(self) -> list[int]:
        """Ids that end the assistant's turn: every engine stops generating at the same ones."""
        vocab = self.tokenizer.get_vocab()
        ids = {vocab[t] for t in _END_OF_TURN if t in vocab}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)


class Engine(ABC):
    """What the labeller needs from a backend."""

    #: short backend name recorded in every output row
    name: str = "engine"

    def __init__(self, config: EngineConfig):
        self.config = config

    @property
    @abstractmethod
    def model_id(self) -> str:
        """What model produced the scores (recorded in every output row)."""

    @abstractmethod
    def count_tokens(self, conversation: Conversation) -> int:
        """Prompt length in tokens, as this engine will see it."""

    def fits(self, conversation: Conversation, tokens: int) -> bool:
        """Whether the prompt takes at most `tokens` tokens (engines with a chat formatter
        answer most prompts without tokenizing them: ChatFormatter.fits)."""
        return self.count_tokens(conversation) <= tokens

    @abstractmethod
    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        """p(yes) / (p(yes) + p(no)) for the first answer token of each conversation."""

    @abstractmethod
    def generate(self, conversations: Sequence[Conversation]) -> list[Generation]:
        """Greedy completion of each conversation (summaries)."""

    def generate_then_score(
        self, requests: Sequence[Conversation], follow_ups: FollowUps
    ) -> tuple[list[Generation], list[list[float]]]:
        """Summary-then-query in one call: complete each request, then score the conversations
        that `follow_ups(i, completion)` builds from request i's completion.

        This default runs `generate` then `score`. The transformers engine overrides it to score
        the follow-ups on the KV cache its generation left behind; vLLM's prefix caching gets
        the same reuse from this default.
        """
        generations = self.generate(requests)
        questions = [list(follow_ups(i, g.text)) for i, g in enumerate(generations)]
        flat = self.score([q for group in questions for q in group])
        return generations, split_by_lengths(flat, [len(group) for group in questions])

    def close(self) -> None:
        """Release the model (GPU memory, worker processes)."""


def model_identity(config: EngineConfig) -> str:
    """The model recorded in output rows and checked against calibrations: the model spec,
    plus the adapter when one is applied (an adapter changes every score)."""
    return config.model + (f"+{config.adapter}" if config.adapter else "")
