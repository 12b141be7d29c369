"""A LoRA adapter folded into the base weights at load against LoRA layers kept apart, in one run.

The transformers engine merges an adapter by default (`merge_adapter`); kept apart, every
adapted linear layer runs two more small matmuls (and, in bf16, casts to the fp32 LoRA weights).

    python benchmarks/bench_adapter.py                      # SmolLM2-135M, a random LoRA, fp32
    python benchmarks/bench_adapter.py --model qwen2.5-coder-1.5b-instruct --dtype bfloat16 \
        --adapter runs/ft/adapter --reports-csv /tmp/openi4/reports.csv --reports 8 \
        --conditions cardiomegaly pleural_effusion atelectasis fracture

Same reports, conditions and batch for both engines, direct method, alternating `--repeats`
times; prints seconds per report for each, the ratio, and the largest score difference.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch

from ray_app.engines import EngineConfig
from ray_app.engines.transformers_engine import TransformersEngine
from ray_app.finetune.datasets import read_reports
from ray_app.labelling.conditions import load_conditions
from ray_app.labelling.labeller import Labeller, ReportTask
from ray_app.labelling.score_cache import ScoreCache
from ray_app.pipeline.embedded_default import sample_file

log = logging.getLogger("bench_adapter")


def random_adapter(model: str, folder: str) -> str:
    """A LoRA with non-zero weights on every default target (timing does not need a trained one)."""
    from peft import LoraConfig, get_peft_model

    from ray_app.finetune.config import DEFAULT_TARGETS
    from ray_app.finetune.train import load_base

    base, _ = load_base(model)
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=list(DEFAULT_TARGETS),
                      init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(folder)
    return folder


def first_reports(path: str | None, n: int) -> list[ReportTask]:
    table = read_reports(path or sample_file("spine_reports.csv"), "report_id", "text", limit=n)
    return [ReportTask(i, t) for i, t in zip(table["report_id"], table["text"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", help="adapter folder; default: a random LoRA")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reports-csv", help="report_id, text; default: the sample spine reports")
    parser.add_argument("--reports", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=EngineConfig.batch_size)
    parser.add_argument("--conditions", nargs="+",
                        default=["spinal_cancer", "spinal_canal_stenosis"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    with tempfile.TemporaryDirectory() as scratch:
        adapter = args.adapter or random_adapter(args.model, scratch)
        labellers = {}
        for merge in (False, True):
            engine = TransformersEngine(EngineConfig(model=args.model, dtype=args.dtype,
                                                     batch_size=args.batch_size, adapter=adapter,
                                                     merge_adapter=merge))
            # Nothing remembered: each repeat asks the engine again.
            labellers[merge] = Labeller(engine, load_conditions(args.conditions), "direct",
                                        score_cache=ScoreCache(0))
        reports = first_reports(args.reports_csv, args.reports)
        seconds = {False: 0.0, True: 0.0}
        scores = {}
        for _ in range(args.repeats):
            for merge, labeller in labellers.items():
                start = time.perf_counter()
                scores[merge] = [row["score"] for row in labeller.label(reports)]
                seconds[merge] += time.perf_counter() - start
    per_report = {m: s / (args.repeats * len(reports)) for m, s in seconds.items()}
    diff = max(abs(a - b) for a, b in zip(scores[False], scores[True]))
    print(f"\nadapter benchmark: {args.model} + {args.adapter or 'a random LoRA'}, {args.dtype}, "
          f"{len(reports)} reports x {len(args.conditions)} conditions, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats")
    print(f"LoRA kept apart {per_report[False]:.3f} s/report | merged at load "
          f"{per_report[True]:.3f} s/report | {per_report[False] / per_report[True]:.2f}x | "
          f"{len(scores[True])} scores, max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
