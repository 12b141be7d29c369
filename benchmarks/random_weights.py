"""A model with another model's architecture, tokenizer and chat template, and random weights.

Speed does not depend on the weights' values, so a machine that cannot hold or fetch the real
weights (a lent GPU that takes 64 MiB of files, say) can still time the engine on the real
architecture. Its scores mean nothing: use it for the benchmarks' seconds and tokens only.

    # here: the architecture and tokenizer only (a few MB), from the pip-shipped GGUF
    python benchmarks/random_weights.py --like qwen2.5-coder-1.5b-instruct --out qwen-arch
    # on the GPU machine: that folder with random bf16 weights, loadable by the engine
    python benchmarks/random_weights.py --like qwen-arch --out /tmp/qwen-random --weights
    python benchmarks/bench_conditions.py --model /tmp/qwen-random --dtype bfloat16 ...

    # here: the same tokenizer and template on a 2-layer, 128-wide model, whose passes cost
    # little, so that the benchmark shows the engine's own work (what a GPU does not speed up)
    python benchmarks/random_weights.py --like qwen2.5-coder-1.5b-instruct --out /tmp/qwen-tiny \
        --weights --layers 2 --hidden 128
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ray_app.engines.model_sources import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--like", required=True, help="model name or folder whose architecture to take")
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", action="store_true",
                        help="also write random weights (bf16); without it, config and tokenizer only")
    parser.add_argument("--layers", type=int,
                        help="keep this many layers (with --hidden: a model whose compute is "
                             "next to nothing, so its timings are mostly the engine's own work: "
                             "templates, tokenizing, packing, masks, launching passes)")
    parser.add_argument("--hidden", type=int, help="hidden size (attention heads scaled to keep "
                                                      "the head size)")
    args = parser.parse_args()

    where = resolve_model(args.like)
    config = AutoConfig.from_pretrained(where.folder, gguf_file=where.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(where.folder, gguf_file=where.gguf_file)
    shrink(config, args.layers, args.hidden)
    config.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    if args.weights:
        torch.manual_seed(0)
        # On the GPU where there is one: initialising 1.5B weights on a CPU takes a minute.
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(args.out)
    print(f"{args.out}: {config.model_type}, {config.num_hidden_layers} layers, hidden "
          f"{config.hidden_size}, vocabulary {config.vocab_size}"
          f"{', random bf16 weights' if args.weights else ''}")


def shrink(config, layers: int | None, hidden: int | None) -> None:
    """Fewer layers and a narrower model of the same kind; the tokenizer and template stay."""
    if layers:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    if hidden:
        head_size = config.hidden_size // config.num_attention_heads
        scale = config.hidden_size // hidden
        config.num_attention_heads = max(1, config.num_attention_heads // scale)
        config.num_key_value_heads = max(1, config.num_key_value_heads // scale)
        config.head_dim = head_size
        config.hidden_size = config.num_attention_heads * head_size
        config.intermediate_size = max(1, config.intermediate_size // scale)


if __name__ == "__main__":
    main()
