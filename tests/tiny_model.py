"""A tiny random Llama with a BPE tokenizer trained on the spot and a ChatML template.

Saved as an ordinary Hugging Face folder, so both engines (transformers and vLLM) load it the
way they load a real model. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "FINDINGS: There is moderate central canal stenosis at L4-L5. No disc herniation.",
    "IMPRESSION: No evidence of metastatic disease. Normal cardiac silhouette.",
    "Clinical history: back pain. Technique: sagittal T2. Comparison: none.",
    "You are a radiologist. Your job is to diagnose the condition using a medical report.",
    "Based on the report, does the patient have it? Answer 'yes' for yes, 'no' for no.",
    "Can you write a summary for the report with the goal of diagnosing the condition?",
    "yes no Yes No pleural effusion pneumothorax cardiomegaly fracture atelectasis",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_model(folder: Path, seed: int = 0, vocab_size: int = 600) -> Path:
    """Write a tiny model + tokenizer to `folder` and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    tok.add_tokens(["yes", "no", " yes", " no"])  # single-token answers, as real vocabularies have
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None,
    )
    fast.chat_template = CHATML
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init, so scores spread over [0, 1]
        model.lm_head.weight.mul_(20)
    model.save_pretrained(folder)
    return folder


def force_next_tokens(model, next_tokens, active=lambda: True):
    """A forward hook that makes `next_tokens(input_ids)` (same shape) win by 1e4 at every
    position that has logits, while `active()` says so. Returns the hook's handle."""
    import torch

    def hook(module, args, kwargs, output):
        if active():
            shown = output.logits.shape[1]
            forced = next_tokens(kwargs["input_ids"][:, -shown:])
            boost = torch.full((*forced.shape, 1), 1e4, dtype=output.logits.dtype,
                               device=output.logits.device)
            output.logits.scatter_add_(2, forced[..., None].to(output.logits.device), boost)

    return model.register_forward_hook(hook, with_kwargs=True)


def scores_one_by_one(engine, conversations) -> list[float]:
    """The reference scores: each conversation alone, one unpadded forward pass, the score from
    the full logits row (what batching, padding and shared prefixes must not change)."""
    import torch

    from ray_app.labelling.scoring import score_from_logits

    scores = []
    for conversation in conversations:
        ids = torch.tensor([engine.formatter.token_ids(conversation)], device=engine.device)
        with torch.inference_mode():
            logits = engine.model(input_ids=ids).logits[0, -1]
        scores.append(score_from_logits(logits.tolist(), engine.formatter.answers(conversation)))
    return scores
