"""Evaluation of a fine-tuned model: held-out loss on target tokens, yes/no scores of a tuned
labeller with AUROC and balanced accuracy, ROUGE of generated impressions.

Also a command that scores a labelling job's output against a truth table, per condition:

    python -m ray_app.finetune.evaluation --labels out/labelled --truth truth.csv
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from ray_app.engines.tensors import yes_scores
from ray_app.evaluation.calibration import CalibrationError, join_truth
from ray_app.evaluation.thresholds import eer_threshold
from ray_app.finetune.masking import TokenisedExample, collate, target_logits
from ray_app.labelling.scoring import AnswerTokens

log = logging.getLogger(__name__)


@dataclass
class HeldoutPass:
    """Sums over one worker's share of the held-out examples (added up across workers)."""

    loss_sum: float = 0.0
    target_tokens: int = 0
    scores: dict[str, float] = field(default_factory=dict)  # example id -> p(yes)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.target_tokens)


@torch.no_grad()
def heldout_pass(model: Any, examples: Sequence[TokenisedExample], batch_size: int, pad_id: int,
                 device: torch.device, answer_tokens: AnswerTokens | None = None) -> HeldoutPass:
    """Cross-entropy summed over target tokens; with `answer_tokens`, also the yes/no score at
    each example's first target position (what the labeller scores)."""
    was_training = model.training
    model.eval()
    result = HeldoutPass()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        logits, targets, keep = target_logits(model, batch)
        logits = logits.float()
        result.loss_sum += float(torch.nn.functional.cross_entropy(logits, targets,
                                                                   reduction="sum"))
        result.target_tokens += len(targets)
        if answer_tokens is not None:
            # the logits are row by row: a row's first target comes after the rows before it
            per_row = keep.sum(dim=1)
            first = per_row.cumsum(dim=0) - per_row
            for example, score in zip(chunk, yes_scores(logits[first], answer_tokens)):
                result.scores[example.example_id] = float(score)
    model.train(was_training)
    return result


def binary_summary(labels: Sequence[int], scores: Sequence[float]) -> dict[str, float | int]:
    """AUROC on scores; balanced accuracy of labels at the equal-error-rate threshold."""
    y, s = np.asarray(labels, dtype=int), np.asarray(scores, dtype=float)
    out: dict[str, float | int] = {"n": len(y), "positives": int(y.sum())}
    try:
        threshold, eer = eer_threshold(y, s)
    except CalibrationError as err:  # one class only: AUROC is undefined too
        log.warning("no AUROC / threshold: %s", err)
        return out
    out.update(auroc=float(roc_auc_score(y, s)), eer=eer, threshold=threshold,
               balanced_accuracy=float(balanced_accuracy_score(y, s >= threshold)),
               mean_score=float(s.mean()))
    return out


def labeller_metrics(scores: dict[str, float], truth: dict[str, int]) -> dict[str, dict]:
    """Per condition, from example ids '<report>/<condition>/<level>' (see datasets)."""
    by_condition: dict[str, tuple[list[int], list[float]]] = {}
    for example_id, score in scores.items():
        condition = example_id.split("/")[-2]
        labels, values = by_condition.setdefault(condition, ([], []))
        labels.append(truth[example_id])
        values.append(score)
    return {name: binary_summary(*pair) for name, pair in sorted(by_condition.items())}


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (the `rouge-score` package, with stemming)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise ImportError("ROUGE needs the rouge-score package: pip install rouge-score") from err
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references, at least one "
                         f"(got {len(predictions)} and {len(references)})")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references):
        for name, value in scorer.score(reference, prediction).items():
            totals[name] += value.fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}


def label_job_metrics(labels_uri: str, truth_uri: str) -> dict[str, dict]:
    """Per condition metrics of a labelling job's scores against a truth table."""
    from ray_app.pipeline.report_tables import read_label_rows

    truth = pd.read_csv(truth_uri, dtype={"report_id": str, "level": str})
    joined = join_truth(read_label_rows(labels_uri), truth)
    return {f"{c}{'@' + lv if lv else ''}": binary_summary(g["label"], g["score"])
            for (c, lv), g in joined.groupby(["condition", "level"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Metrics of labelling-job scores vs. a truth "
                                                 "table (report_id, condition, level, label).")
    parser.add_argument("--labels", required=True, help="labelling job output folder")
    parser.add_argument("--truth", required=True, help="truth CSV")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(label_job_metrics(args.labels, args.truth), indent=2))


if __name__ == "__main__":
    main()
