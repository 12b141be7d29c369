"""LoRA fine-tuning speed and memory by dtype, loss and padding: the same optimizer steps on the
same examples, side by side.

Trains the fine-tuning job's own step (`ray_app.finetune.train`) on the labeller examples of the
embedded spine reports (or of a labelled table given with --reports/--labels), once per dtype,
loss and `pad_to_multiple_of`, from the same LoRA initialisation:

    python benchmarks/bench_finetune.py --model qwen2.5-coder-1.5b-instruct --steps 4
    python benchmarks/bench_finetune.py --dtypes bfloat16 --pad-multiples 1 64 --steps 120

Padding: 1 pads each micro-batch to its longest example only, so nearly every step has a new
shape; over many steps that run slows down and grows (the "last third" column).

Losses: `targets` (the job's: logits of the target positions only) and `all` (transformers'
`labels=` loss, which projects every prompt position onto the vocabulary first).
Prints training tokens/s per run, the ratio to the first, the loss after the last step (runs
should learn alike) and the peak memory of each run (each in its own process).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import torch

from ray_app.finetune.config import FinetuneConfig
from ray_app.finetune.masking import target_loss
from ray_app.finetune.ray_job import prepare_data
from ray_app.finetune.train import (
    LocalContext,
    _optimizer,
    _optimizer_step,
    add_lora,
    load_base,
    load_tokenizer,
    make_schedule,
    pad_id,
)
from ray_app.pipeline.embedded_default import SAMPLE_CONDITIONS, sample_file


def _all_positions_loss(model, batch):
    return model(**batch).loss


LOSSES = {"targets": target_loss, "all": _all_positions_loss}


def _run(cfg: FinetuneConfig, dtype_name: str, loss: str, train, steps: int,
         threads: int | None) -> dict[str, float]:
    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    model, tokenizer = load_base(cfg.model, dtype)
    model = add_lora(model, cfg)  # seeded: every dtype starts from the same adapter
    optimizer, scheduler = _optimizer(model, cfg, None)
    schedule = make_schedule(len(train), cfg, 0, 1)
    ctx, pad = LocalContext(folder=None), pad_id(tokenizer)
    model.train()
    results = [_optimizer_step(model, optimizer, scheduler,
                               schedule.steps[i % len(schedule.steps)], train, pad, ctx, dtype,
                               LOSSES[loss], cfg.pad_to_multiple_of) for i in range(steps + 1)]
    timed = results[1:]  # the first step pays one-off allocation and kernel selection
    last = timed[-max(1, len(timed) // 3):]
    return {"tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["seconds"] for r in timed),
            "last_third": sum(r["tokens"] for r in last) / sum(r["seconds"] for r in last),
            "loss": timed[-1]["loss"],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--reports", default=sample_file("spine_reports.csv"))
    parser.add_argument("--labels", default=sample_file("spine_answers.csv"),
                        help="report_id, condition, level, label table for --reports")
    parser.add_argument("--conditions", nargs="+", default=list(SAMPLE_CONDITIONS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--losses", nargs="+", default=["targets"], choices=sorted(LOSSES))
    parser.add_argument("--steps", type=int, default=4, help="timed steps (one more warms up)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pad-multiples", nargs="+", type=int,
                        default=[FinetuneConfig.pad_to_multiple_of],
                        help="pad_to_multiple_of values to compare (1: the longest example)")
    args = parser.parse_args()
    cfg = FinetuneConfig(mode="labeller", train_input=args.reports, train_labels=args.labels,
                         conditions=args.conditions, output="-", model=args.model,
                         batch_size=args.batch_size, max_length=args.max_length,
                         learning_rate=1e-4)
    train, _, _ = prepare_data(cfg, load_tokenizer(args.model))  # the job's own examples
    print(f"{args.model}: {len(train)} examples, {args.steps} timed steps of {args.batch_size}, "
          f"{args.threads or torch.get_num_threads()} threads")
    rows = []
    for dtype, loss, multiple in itertools.product(args.dtypes, args.losses, args.pad_multiples):
        started = time.perf_counter()
        run_cfg = replace(cfg, pad_to_multiple_of=multiple)
        # A fresh process per run: its peak memory is its own, and no caches carry over.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            result = pool.submit(_run, run_cfg, dtype, loss, train, args.steps,
                                 args.threads).result()
        name = f"{dtype}, {loss}, pad {multiple}"
        rows.append((name, result))
        print(f"  {name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    first = rows[0][1]["tokens_per_s"]
    print(f"{'dtype, loss, padding':<26} {'tokens/s':>9} {'x first':>8} {'last third':>11} "
          f"{'last loss':>10} {'peak RSS GB':>12}")
    for name, r in rows:
        print(f"{name:<26} {r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / first:>8.2f} "
              f"{r['last_third']:>11.1f} {r['loss']:>10.4f} {r['peak_rss_gb']:>12.1f}")


if __name__ == "__main__":
    main()
