"""The training loop of one data-parallel worker: LoRA on a causal LM, plain torch.

Nothing here imports Ray. The loop talks to its surroundings through a `WorkerContext` (rank,
device, model wrapping, metric/checkpoint reporting, the checkpoint to resume from), which
`ray_job` implements with Ray Train and `LocalContext` implements for a single process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from ray_app.engines.devices import resolve_dtype
from ray_app.finetune.config import FinetuneConfig
from ray_app.finetune.evaluation import (
    HeldoutPass,
    heldout_pass,
    labeller_metrics,
    rouge,
)
from ray_app.finetune.masking import (
    IGNORE_INDEX,
    TokenisedExample,
    collate,
    target_loss,
)
from ray_app.labelling.scoring import answer_tokens

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"
#: Every file of a checkpoint folder and its size in bytes, written last by the worker.
MANIFEST_FILE = "checkpoint_manifest.json"
ADAPTER_DIR = "adapter"


class WorkerContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def wrap(self, model: Any) -> Any: ...
    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None: ...
    def resume_dir(self) -> str | None: ...
    def gather(self, value: Any) -> list[Any]: ...


@dataclass
class LocalContext:
    """One process, no Ray: checkpoints are copied to `<folder>/step-N`."""

    folder: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    reports: list[dict[str, Any]] = field(default_factory=list)

    def wrap(self, model: Any) -> Any:
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir:
            shutil.copytree(checkpoint_dir, self.folder / f"step-{metrics['step']:08d}")

    def resume_dir(self) -> str | None:
        found = sorted(self.folder.glob("step-*"))
        return str(found[-1]) if found else None

    def gather(self, value: Any) -> list[Any]:
        return [value]


@dataclass
class Schedule:
    """Optimizer steps of one worker: each a list of micro-batches of example indices."""

    steps: list[list[list[int]]]
    epoch_of_step: list[int]


def make_schedule(n_examples: int, cfg: FinetuneConfig, rank: int, world: int) -> Schedule:
    """Same shuffled order on every worker (seeded per epoch), split so that every worker runs
    the same number of steps (uneven counts would hang the gradient all-reduce)."""
    per_worker = n_examples // world
    if per_worker == 0:
        raise ValueError(f"{n_examples} training examples cannot feed {world} workers")
    steps, epochs = [], []
    for epoch in range(cfg.epochs):
        order = np.random.default_rng(cfg.seed + epoch).permutation(n_examples)
        mine = order[rank::world][:per_worker].tolist()
        micro = [mine[i:i + cfg.batch_size] for i in range(0, per_worker, cfg.batch_size)]
        for i in range(0, len(micro), cfg.grad_accumulation):
            steps.append(micro[i:i + cfg.grad_accumulation])
            epochs.append(epoch)
    if cfg.max_steps is not None:
        steps, epochs = steps[:cfg.max_steps], epochs[:cfg.max_steps]
    return Schedule(steps, epochs)


def load_tokenizer(model_spec: str) -> Any:
    from transformers import AutoTokenizer

    from ray_app.engines.model_sources import resolve_model

    location = resolve_model(model_spec)
    return AutoTokenizer.from_pretrained(location.folder, gguf_file=location.gguf_file)


def load_base(model_spec: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Base model in `dtype` and its tokenizer, from any model source."""
    from transformers import AutoModelForCausalLM

    from ray_app.engines.model_sources import quiet_loading, resolve_model

    location = resolve_model(model_spec)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(location.folder, gguf_file=location.gguf_file,
                                                     dtype=dtype)
    return model, load_tokenizer(model_spec)


def add_lora(model: Any, cfg: FinetuneConfig, start: dict[str, bytes] | None = None) -> Any:
    """Wrap `model` with LoRA layers: fresh (seeded: every worker starts identical), or the
    trainable copy of an earlier adapter given as its files' bytes (`start`, read once on the
    driver so that workers on other nodes need no access to its folder)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(cfg.seed)
    if start:
        with tempfile.TemporaryDirectory() as folder:
            for name, data in start.items():
                (Path(folder) / name).write_bytes(data)
            model = PeftModel.from_pretrained(model, folder, is_trainable=True)
    else:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def pad_id(tokenizer: Any) -> int:
    """Padding is masked (attention 0, label -100), so any id will do; EOS when none is set."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


@dataclass
class RunState:
    step: int = 0
    eval_before: dict[str, Any] | None = None
    eval_after: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)
    world_size: int = 1
    dtype: str = "float32"


def train_worker(cfg: FinetuneConfig, train: Sequence[TokenisedExample],
                 heldout: Sequence[TokenisedExample], ctx: WorkerContext,
                 start: dict[str, bytes] | None = None, unsure: str = "") -> RunState:
    """Train, checkpointing every `checkpoint_every` steps and at the end; resume from the
    context's checkpoint if it has one. Held-out evaluation before (fresh runs) and after.
    `start`: the files of an adapter to go on training (`init_adapter`), else fresh LoRA.
    `unsure`: the labeller wording's unsure answer (ray_job.labeller_unsure), which held-out
    scores count against yes as the label job does; training targets stay yes and no."""
    dtype = resolve_dtype(cfg.dtype, ctx.device)
    log.info("worker %d trains on %s in %s", ctx.rank, ctx.device, dtype)
    model, tokenizer = load_base(cfg.model, dtype)
    model = add_lora(model, cfg, start)
    state, optimizer_state = _resume(model, ctx)
    peft_model = model
    model = ctx.wrap(model)
    optimizer, scheduler = _optimizer(model, cfg, optimizer_state)
    evaluate = _Evaluator(cfg, heldout, tokenizer, peft_model, ctx, dtype, unsure)
    if state.eval_before is None and state.step == 0:
        state.eval_before = evaluate()
    state.world_size, state.dtype = ctx.world_size, str(dtype).removeprefix("torch.")
    schedule = make_schedule(len(train), cfg, ctx.rank, ctx.world_size)
    pad = pad_id(tokenizer)
    model.train()
    for step in range(state.step, len(schedule.steps)):
        metrics = _optimizer_step(model, optimizer, scheduler, schedule.steps[step], train, pad,
                                  ctx, dtype, pad_to_multiple_of=cfg.pad_to_multiple_of)
        state.step = step + 1
        metrics.update(step=state.step, epoch=schedule.epoch_of_step[step])
        _log_step(cfg, state, metrics, len(schedule.steps), ctx)
        last = state.step == len(schedule.steps)
        if last:
            state.eval_after = evaluate()
            metrics.update(eval_before=state.eval_before, eval_after=state.eval_after)
        # Ray Train's report() waits for its controller (~2 s on a small node), so metrics
        # go to Ray with checkpoints only; every step is logged and kept in the history.
        if last or state.step % cfg.checkpoint_every == 0:
            _report_checkpoint(peft_model, optimizer, scheduler, state, metrics, ctx)
    return state


def _optimizer(model: Any, cfg: FinetuneConfig, saved: dict | None):
    """AdamW on the trainable (LoRA) parameters, linear warm-up then constant; restored from
    a checkpoint's state when resuming."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    return optimizer, scheduler


def _optimizer_step(model, optimizer, scheduler, micro_batches: list[list[int]],
                    train: Sequence[TokenisedExample], pad: int, ctx: WorkerContext,
                    dtype: torch.dtype, loss_of: Callable = target_loss,
                    pad_to_multiple_of: int = 1) -> dict[str, Any]:
    started = time.perf_counter()
    loss_total, tokens = 0.0, 0
    for i, indices in enumerate(micro_batches):
        examples = [train[j] for j in indices]
        batch = {k: v.to(ctx.device) for k, v in collate(examples, pad, pad_to_multiple_of).items()}
        tokens += int(batch["attention_mask"].sum())
        # Gradients are all-reduced on the last micro-batch only.
        sync = (model.no_sync() if hasattr(model, "no_sync") and i < len(micro_batches) - 1
                else contextlib.nullcontext())
        with sync, _autocast(ctx.device, dtype):
            loss = loss_of(model, batch) / len(micro_batches)
            loss.backward()
        loss_total += float(loss.detach())
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return {"loss": loss_total, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "lr": scheduler.get_last_lr()[0]}


def _autocast(device: torch.device, dtype: torch.dtype):
    """bf16 matmuls for the fp32 LoRA layers too, where the base runs in bf16."""
    if dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _log_step(cfg: FinetuneConfig, state: RunState, metrics: dict[str, Any], total: int,
              ctx: WorkerContext) -> None:
    summed = ctx.gather(metrics["tokens_per_s"])
    metrics["tokens_per_s_all_workers"] = float(sum(summed))
    if ctx.rank == 0:
        state.history.append({k: metrics[k] for k in
                              ("step", "epoch", "loss", "tokens", "tokens_per_s", "lr")})
    if state.step % cfg.log_every == 0 or state.step == total:
        log.info("worker %d step %d/%d epoch %d loss %.4f tokens/s %.1f (all workers %.1f)",
                 ctx.rank, state.step, total, metrics["epoch"], metrics["loss"],
                 metrics["tokens_per_s"], metrics["tokens_per_s_all_workers"])


class _Evaluator:
    """Held-out loss on target tokens (all modes), yes/no metrics (labeller), ROUGE
    (impression); each worker takes its share, rank 0 gets the totals."""

    def __init__(self, cfg, heldout, tokenizer, model, ctx, dtype, unsure=""):
        self.cfg, self.heldout, self.tokenizer, self.model, self.ctx, self.dtype = (
            cfg, list(heldout), tokenizer, model, ctx, dtype)
        self.answers = answer_tokens(tokenizer, unsure) if cfg.mode == "labeller" else None

    def __call__(self) -> dict[str, Any] | None:
        if not self.heldout:
            return None
        mine = self.heldout[self.ctx.rank::self.ctx.world_size]
        with _autocast(self.ctx.device, self.dtype):
            part = heldout_pass(self.model, mine, self.cfg.batch_size, pad_id(self.tokenizer),
                                self.ctx.device, self.answers)
        parts = self.ctx.gather(part)
        total = HeldoutPass(sum(p.loss_sum for p in parts), sum(p.target_tokens for p in parts),
                            {k: v for p in parts for k, v in p.scores.items()})
        result: dict[str, Any] = {"loss": total.loss, "target_tokens": total.target_tokens,
                                  "examples": len(self.heldout)}
        if self.answers is not None:
            truth = {e.example_id: int(e.labels[-1] in self.answers.yes_ids)
                     for e in self.heldout}
            result["labeller"] = labeller_metrics(total.scores, truth)
        if self.cfg.mode == "impression" and self.cfg.eval_generate and self.ctx.rank == 0:
            result["rouge"] = self._rouge()
        if self.ctx.rank == 0:
            log.info("held-out: %s", json.dumps(result))
        return result

    @torch.no_grad()
    def _rouge(self) -> dict[str, float]:
        predictions, references = [], []
        was_training = self.model.training
        self.model.eval()
        for example in self.heldout[: self.cfg.eval_generate]:
            prompt = [t for t, lab in zip(example.input_ids, example.labels) if lab == IGNORE_INDEX]
            target = [t for t in example.labels if t != IGNORE_INDEX]
            output = self.model.generate(
                input_ids=torch.tensor([prompt], device=self.ctx.device),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=self.ctx.device),
                max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad_id(self.tokenizer))
            predictions.append(self.tokenizer.decode(output[0, len(prompt):],
                                                     skip_special_tokens=True))
            references.append(self.tokenizer.decode(target, skip_special_tokens=True))
        self.model.train(was_training)
        return rouge(predictions, references)


def _resume(model: Any, ctx: WorkerContext) -> tuple[RunState, dict | None]:
    """Load adapter weights, optimizer state and progress from the checkpoint, if any."""
    folder = ctx.resume_dir()
    if folder is None:
        return RunState(), None
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = RunState(**json.loads((Path(folder) / STATE_FILE).read_text()))
    weights = load_file(str(Path(folder) / ADAPTER_DIR / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    optimizer_state = torch.load(Path(folder) / OPTIMIZER_FILE, map_location="cpu",
                                 weights_only=True)
    state.resumed_from.append(state.step)
    log.info("worker %d resumes from step %d (%s)", ctx.rank, state.step, folder)
    return state, optimizer_state


def _report_checkpoint(peft_model, optimizer, scheduler, state: RunState,
                       metrics: dict[str, Any], ctx: WorkerContext) -> None:
    """Rank 0 writes adapter + optimizer + progress; every rank reports (Ray needs all)."""
    if ctx.rank != 0:
        ctx.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ray_app_ckpt_") as folder:
        peft_model.save_pretrained(os.path.join(folder, ADAPTER_DIR))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   os.path.join(folder, OPTIMIZER_FILE))
        Path(folder, STATE_FILE).write_text(json.dumps(state.__dict__))
        _write_manifest(Path(folder))
        ctx.report(metrics, folder)
    log.info("checkpoint at step %d", state.step)


def _write_manifest(folder: Path) -> None:
    sizes = {str(path.relative_to(folder)): path.stat().st_size
             for path in sorted(folder.rglob("*")) if path.is_file()}
    (folder / MANIFEST_FILE).write_text(json.dumps(sizes, indent=1))


def checkpoint_complete(folder: Path, required: tuple[str, ...]) -> bool:
    """Whether a checkpoint folder in storage holds every file its manifest lists, each whole
    (its recorded size), `required` among them. Ray copies a checkpoint's files to storage in
    its own order, so a job killed mid-copy can leave any of them missing or cut short; the
    manifest, whenever it arrived, tells which."""
    try:
        sizes = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not set(required) <= set(sizes):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size
               for name, size in sizes.items())
