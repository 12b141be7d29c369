"""The fine-tuning job's settings: one dataclass, every field documented, the paper's LoRA
values as defaults (the MICCAI 2024 paper's summary fine-tuning: r 16, alpha 8)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray_app.pipeline.config_cli import from_mapping

MODES = ("summary", "labeller", "impression")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run needs; every field is a key of the job's YAML."""

    mode: str = field(metadata={"doc": "'summary' (summary SFT), 'labeller' (instruction-tuned "
                                       "yes/no labeller) or 'impression' (findings -> impression)."})
    train_input: str = field(metadata={"doc": "Reports for training: CSV, Parquet or JSONL with "
                                              "an id and a text column."})
    output: str = field(metadata={"doc": "Output folder: adapter/, provenance.json, merged/."})
    model: str = field(default="smollm2-135m-instruct",
                       metadata={"doc": "Base model: pip model name, HF folder or .gguf file."})
    eval_input: str | None = field(default=None,
                                   metadata={"doc": "Held-out reports (same format); evaluated "
                                                    "before and after training."})
    train_labels: str | None = field(default=None,
                                     metadata={"doc": "labeller: table of report_id, condition, "
                                                      "level, label (0/1) for train_input."})
    eval_labels: str | None = field(default=None,
                                    metadata={"doc": "labeller: the same table for eval_input."})
    conditions: list[str] = field(default_factory=list,
                                  metadata={"doc": "labeller: condition names or YAML paths "
                                                   "whose labels are trained."})
    prompt: str | None = field(default=None,
                               metadata={"doc": "labeller: the wording trained on, as the label "
                                                "job's --prompt (a built-in name such as "
                                                "report_first, or a prompt YAML); None: the one "
                                                "the conditions ask for. Label with the same."})
    id_column: str = field(default="report_id", metadata={"doc": "Column with report ids."})
    text_column: str = field(default="text", metadata={"doc": "Column with report text."})
    summary_kinds: list[str] = field(default_factory=lambda: ["impression", "findings"],
                                     metadata={"doc": "summary: section kinds that count as the "
                                                      "summary (the paper: impression/conclusion/"
                                                      "summary, else findings)."})
    # LoRA (paper defaults)
    lora_r: int = field(default=16, metadata={"doc": "LoRA rank."})
    lora_alpha: int = field(default=8, metadata={"doc": "LoRA scaling numerator (alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"doc": "Dropout on the LoRA input."})
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS),
                                      metadata={"doc": "Linear layers that get adapters."})
    init_adapter: str | None = field(default=None,
                                     metadata={"doc": "An earlier run's <output>/adapter to go "
                                                      "on training (more hand labels arrived): "
                                                      "its LoRA shape replaces lora_r, "
                                                      "lora_alpha, lora_dropout and "
                                                      "target_modules; its base model must be "
                                                      "`model`. None: fresh LoRA weights."})
    # Optimisation
    learning_rate: float = field(default=1e-5, metadata={"doc": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"doc": "AdamW weight decay."})
    warmup_steps: int = field(default=0, metadata={"doc": "Linear warm-up steps, then constant."})
    epochs: int = field(default=3, metadata={"doc": "Passes over the training examples."})
    max_steps: int | None = field(default=None,
                                  metadata={"doc": "Stop after this many optimizer steps "
                                                   "(None: all epochs)."})
    batch_size: int = field(default=4, metadata={"doc": "Examples per worker per micro-batch."})
    grad_accumulation: int = field(default=1,
                                   metadata={"doc": "Micro-batches per optimizer step."})
    max_length: int = field(default=1024,
                            metadata={"doc": "Longest training sequence in tokens; longer "
                                             "prompts lose their middle, targets are kept."})
    pad_to_multiple_of: int = field(default=64,
                                    metadata={"doc": "Pad each micro-batch's length up to a "
                                                     "multiple of this (1: to its longest "
                                                     "example only). Few distinct shapes keep "
                                                     "per-shape kernel caches small: with 1 a "
                                                     "CPU run slows down and grows over its "
                                                     "steps (benchmarks/bench_finetune.py)."})
    prompt_head_tokens: int = field(default=64,
                                    metadata={"doc": "Tokens kept at a truncated prompt's start "
                                                     "(chat template, instructions)."})
    seed: int = field(default=0, metadata={"doc": "Seed of data order and LoRA initialisation."})
    gradient_checkpointing: bool = field(default=False,
                                         metadata={"doc": "Recompute activations: less memory, "
                                                          "~30% more compute."})
    # Workers
    num_workers: int = field(default=1, metadata={"doc": "Data-parallel Ray Train workers."})
    use_gpu: bool | None = field(default=None,
                                 metadata={"doc": "One GPU per worker; None: if the cluster "
                                                  "has GPUs."})
    dtype: str = field(default="auto",
                       metadata={"doc": "Frozen base weights and autocast: 'auto' is bf16 on a "
                                        "GPU or a CPU with bf16 instructions (AVX512-BF16, AMX), "
                                        "else fp32; 'float32' or 'bfloat16' to choose. LoRA "
                                        "weights and optimizer state stay fp32."})
    cpus_per_worker: float = field(default=1.0,
                                   metadata={"doc": "CPUs reserved per worker (fractions allowed)."})
    torch_threads: int | None = field(default=None,
                                      metadata={"doc": "torch threads per CPU worker; None: the "
                                                       "node's cores / workers."})
    # Checkpoints, logs, evaluation
    storage_path: str | None = field(default=None,
                                     metadata={"doc": "Ray Train storage for checkpoints (shared "
                                                      "on a cluster); None: <output>/ray_train."})
    run_name: str = field(default="finetune",
                          metadata={"doc": "Run name under storage_path; rerunning the same name "
                                           "resumes from its latest checkpoint."})
    checkpoint_every: int = field(default=100, metadata={"doc": "Optimizer steps per checkpoint."})
    keep_checkpoints: int = field(default=2, metadata={"doc": "Checkpoints kept on storage."})
    max_failures: int = field(default=2,
                              metadata={"doc": "Training-worker failures (a killed process, a lost "
                                               "node) that the run recovers from its latest "
                                               "checkpoint by itself before the job fails; -1: "
                                               "no limit. Preempted nodes are always recovered."})
    log_every: int = field(default=1, metadata={"doc": "Optimizer steps between loss/tokens/s logs."})
    eval_generate: int = field(default=0,
                               metadata={"doc": "impression: held-out examples generated for "
                                                "ROUGE before and after (0: none)."})
    max_new_tokens: int = field(default=96, metadata={"doc": "Longest generated impression."})
    merge: bool = field(default=False,
                        metadata={"doc": "Also write merged/ (base + adapter as one HF model)."})
    limit: int | None = field(default=None, metadata={"doc": "Only the first N reports (trials)."})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")
        if self.mode == "labeller" and not (self.train_labels and self.conditions):
            raise ValueError("mode 'labeller' needs train_labels (report_id, condition, level, "
                             "label) and conditions")
        if self.eval_input and self.mode == "labeller" and not self.eval_labels:
            raise ValueError("mode 'labeller' with eval_input needs eval_labels")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r} is not one of 'auto', 'float32', 'bfloat16'")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be -1 (no limit) or more, got {self.max_failures}")
        for name in ("batch_size", "grad_accumulation", "epochs", "max_length", "pad_to_multiple_of",
                     "checkpoint_every", "num_workers", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneConfig":
        """From a mapping of fields (a YAML's, a worker's copy), typed and checked like the
        job's --config (ray_app.pipeline.config_cli): `3e-4` read as text is a number."""
        return from_mapping(cls, data, "fine-tuning config", what="fine-tuning setting")
