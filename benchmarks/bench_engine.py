"""Engine benchmark: our transformers engine against a reference-style loop.

The reference loop does what the paper's reference code does: batch size 1, one `generate`
call per question (levels included), and for summary-then-query the second prompt encoded again
from scratch. Both share one loaded model (same weights, same dtype) and the same reports.

    python benchmarks/bench_engine.py --model smollm2-135m-instruct --reports 64 --dtype float32

Prints reports/s for each method side by side, the speed-up, and the largest score difference.
"""

from __future__ import annotations

import argparse
import logging
import time

import pandas as pd
import torch

from ray_app.engines import EngineConfig
from ray_app.engines.transformers_engine import TransformersEngine
from ray_app.labelling import prompts
from ray_app.labelling.conditions import load_conditions
from ray_app.labelling.labeller import Labeller, ReportTask
from ray_app.labelling.scoring import score_from_logits
from ray_app.pipeline.embedded_default import sample_file

log = logging.getLogger("bench_engine")


class ReferenceLoop:
    """One report, one question, one `generate` call at a time."""

    def __init__(self, engine: TransformersEngine, max_new_tokens: int, repetition_penalty: float):
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.repetition_penalty = repetition_penalty

    def _generate(self, conversation: prompts.Conversation, max_new_tokens: int):
        text = self.engine.formatter.render(conversation)
        inputs = self.engine.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        return self.engine.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False,
            repetition_penalty=self.repetition_penalty, eos_token_id=self.engine.stop_ids,
            pad_token_id=self.engine.tokenizer.pad_token_id, output_scores=True,
            return_dict_in_generate=True,
        ), inputs["input_ids"].shape[1]

    @torch.inference_mode()
    def score(self, conversation: prompts.Conversation) -> float:
        out, _ = self._generate(conversation, 1)
        return score_from_logits(out.scores[0][0].tolist(), self.engine.formatter.answer_tokens)

    @torch.inference_mode()
    def summary(self, conversation: prompts.Conversation) -> str:
        out, prompt_len = self._generate(conversation, self.max_new_tokens)
        new = out.sequences[0, prompt_len:]
        return self.engine.tokenizer.decode(new, skip_special_tokens=True).strip()

    def label(self, reports: list[ReportTask], labeller: Labeller) -> list[float]:
        scores = []
        template = labeller.template
        for task in reports:
            for condition in labeller.conditions.values():
                item = labeller._prepare(task.report_id, task.text, condition)
                summary = None
                if labeller.method == "summary":
                    summary = self.summary(prompts.summary_request_conversation(
                        template, condition, item.report))
                for level in prompts.question_levels(condition):
                    conv = (prompts.summary_question_conversation(template, condition, item.report,
                                                                  summary, level)
                            if summary is not None else
                            prompts.direct_conversation(template, condition, item.report, level))
                    scores.append(self.score(conv))
        return scores


def sample_reports(n: int) -> list[ReportTask]:
    texts = pd.read_csv(sample_file("spine_reports.csv"), dtype=str)["text"].tolist()
    return [ReportTask(f"r{i}", texts[i % len(texts)]) for i in range(n)]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--reports", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=EngineConfig.batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--methods", nargs="+", default=["direct", "summary"])
    parser.add_argument("--conditions", nargs="+",
                        default=["spinal_cancer", "spinal_canal_stenosis"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    config = EngineConfig(model=args.model, dtype=args.dtype, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens)
    engine = TransformersEngine(config)
    reference = ReferenceLoop(engine, args.max_new_tokens, config.repetition_penalty)
    reports = sample_reports(args.reports)
    conditions = load_conditions(args.conditions)
    lines = []
    for method in args.methods:
        labeller = Labeller(engine, conditions, method)
        ours, t_ours = timed(lambda: [r["score"] for r in labeller.label(reports)])
        ref, t_ref = timed(lambda: reference.label(reports, labeller))
        diff = max(abs(a - b) for a, b in zip(ours, ref))
        lines.append(
            f"{method:8s} reference {len(reports) / t_ref:6.2f} reports/s | ours "
            f"{len(reports) / t_ours:6.2f} reports/s | speed-up {t_ref / t_ours:5.2f}x | "
            f"{len(ours)} scores, max |diff| {diff:.2e}"
        )
        log.info(lines[-1])
    print(f"\nengine benchmark: {args.model}, {args.dtype}, {len(reports)} reports, conditions "
          f"{args.conditions}, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
