"""Which threshold method transfers best from a small calibration set: every method of
ray_app.evaluation.thresholds.THRESHOLD_METHODS is fitted on the calibration part of R seeded
splits of the hand-labelled reports (the split of jobs/evaluate.py) and judged by balanced
accuracy on the evaluation part of the same split.

    python benchmarks/compare_thresholds.py --truth truth.csv --run qwen=out/qwen --run rules=out/rules
    python benchmarks/compare_thresholds.py --synthetic openi --datasets 10 --repeats 100

Printed per (run, condition, level) and method: mean balanced accuracy on the evaluation parts
with its standard deviation over the splits, then the mean over every question and how often
each method beat, tied or lost to the paper's `eer` on the same split. `--synthetic SCENARIO`
draws seeded label runs instead of reading folders (SCENARIOS below: LLM-like scores that pile
up between 0.5 and 1.0 for negatives and near 1.0 for the few positives). `--oracle` adds the
column `oracle`: the best threshold chosen on the evaluation part itself, not a method but the
ceiling of every method: what the scores' ranking allows, whatever the calibration set.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from scipy.special import logit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ray_app.evaluation.calibration import THRESHOLD_METHODS, join_truth
from ray_app.evaluation.runs import split_reports  # noqa: E402
from ray_app.evaluation.thresholds import fit_threshold

# --- The comparison ----------------------------------------------------------------------------


ORACLE = "oracle"


def compare_methods(runs: dict[str, pd.DataFrame], truth: pd.DataFrame, methods: list[str],
                    repeats: int, fraction: float = 0.3, first_seed: int = 0) -> pd.DataFrame:
    """One row per (split, run, condition, level, method) whose calibration part has both
    classes: the threshold and balanced accuracy, sensitivity and specificity on the evaluation
    part. Split r is jobs/evaluate.py's split with seed first_seed + r."""
    questions = [(name, condition, level, group["report_id"].to_numpy(),
                  group["label"].astype(int).to_numpy(), group["score"].to_numpy(dtype=float))
                 for name, labels in runs.items()
                 for (condition, level), group in join_truth(labels, truth).groupby(
                     ["condition", "level"], sort=True)]
    rows = []
    for split in range(repeats):
        calibration_ids, _ = split_reports(truth, fraction, first_seed + split)
        for name, condition, level, ids, y, s in questions:
            part = np.isin(ids, list(calibration_ids))
            if len(set(y[part])) < 2 or len(set(y[~part])) < 2:
                continue  # no threshold, or nothing to judge it on (as jobs/evaluate.py)
            key = {"split": split, "run": name, "condition": condition, "level": level,
                   "calibration_positives": int(y[part].sum())}
            for method in methods:
                if method == ORACLE:  # Youden's J on the evaluation part: its best threshold
                    threshold = fit_threshold(y[~part], s[~part], "youden")
                else:
                    threshold = fit_threshold(y[part], s[part], method)
                rows.append({**key, "method": method, "threshold": threshold,
                             **label_metrics(y[~part], s[~part], threshold)})
    return pd.DataFrame(rows)


def label_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict:
    """Balanced accuracy, sensitivity and specificity of `score >= threshold`, as
    metrics.binary_metrics has them (without its AUROC and EER, which this loop does not need)."""
    predicted = s >= threshold
    sensitivity = float(predicted[y == 1].mean())
    specificity = float(1.0 - predicted[y == 0].mean())
    return {"balanced_accuracy": (sensitivity + specificity) / 2, "sensitivity": sensitivity,
            "specificity": specificity}


def summarise(results: pd.DataFrame, baseline: str = "eer") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per question: mean and sd of balanced accuracy per method, side by side; overall: per
    method the mean over questions and splits, and wins/ties/losses against `baseline` on the
    same split and question)."""
    keys = ["run", "condition", "level"]
    grouped = results.groupby([*keys, "method"], sort=False)["balanced_accuracy"]
    stats = grouped.agg(["mean", "std"]).reset_index()
    stats["cell"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(stats["mean"], stats["std"].fillna(0))]
    per_question = stats.pivot(index=keys, columns="method", values="cell")
    methods = list(dict.fromkeys(results["method"]))
    per_question = per_question[methods]
    wide = results.pivot_table(index=["split", *keys], columns="method",
                               values="balanced_accuracy")
    overall = []
    for method in methods:
        row = {"method": method, "mean": wide[method].mean(),
               "mean_sensitivity": results.loc[results["method"] == method, "sensitivity"].mean(),
               "mean_specificity": results.loc[results["method"] == method, "specificity"].mean()}
        if baseline in wide and method != baseline:
            diff = wide[method] - wide[baseline]
            row.update(vs_eer=diff.mean(), wins=int((diff > 1e-12).sum()),
                       ties=int((diff.abs() <= 1e-12).sum()), losses=int((diff < -1e-12).sum()))
        overall.append(row)
    overall = pd.DataFrame(overall).set_index("method")
    for column in ("wins", "ties", "losses"):
        if column in overall:
            overall[column] = overall[column].astype("Int64")
    return per_question, overall


# --- Seeded synthetic runs ----------------------------------------------------------------------


Draw = Callable[[np.random.Generator, int], np.ndarray]


def normal(mean: float, sd: float) -> Draw:
    return lambda rng, n: rng.normal(mean, sd, n)


def mixture(hard: float, main: Draw, other: Draw) -> Draw:
    """`main`, except a `hard` fraction from `other`: negatives whose report mentions the
    finding, subtle positives."""
    return lambda rng, n: np.where(rng.random(n) < hard, other(rng, n), main(rng, n))


def skewed(start: float, shape: float, scale: float, sign: float) -> Draw:
    """start + sign * Gamma(shape, scale): a long tail towards the other class."""
    return lambda rng, n: start + sign * rng.gamma(shape, scale, n)


def probability(low: float, high: float) -> Draw:
    """Uniform between two probabilities, as log-odds (the issue's 'between 0.5 and 1.0')."""
    return lambda rng, n: logit(rng.uniform(low, high, n))


def near_one(fewest_nines: float, most_nines: float) -> Draw:
    """1 - 10^-U(fewest, most) as log-odds: 0.99 ... 0.999999 for (2, 6)."""
    return lambda rng, n: logit(1.0 - 10.0 ** -rng.uniform(fewest_nines, most_nines, n))


@dataclass(frozen=True)
class ScoreModel:
    """Log-odds, logit(p_yes), of the negatives and of the positives; `doc` says what it is."""

    negative: Draw
    positive: Draw
    doc: str


# Open-i development split prevalences (of 2,979 reports; shared/data/openi/README.md).
OPENI_PREVALENCE = {"cardiomegaly": 276 / 2979, "pleural_effusion": 110 / 2979,
                    "atelectasis": 251 / 2979, "fracture": 63 / 2979,
                    "pulmonary_edema": 32 / 2979}

SCENARIOS: dict[str, ScoreModel] = {
    "openi": ScoreModel(normal(1.5, 1.0), normal(6.0, 1.5),
                        "negatives 0.5-0.99, positives 0.99-0.9999 (log-odds normal)"),
    "openi-hard": ScoreModel(mixture(0.1, normal(1.5, 1.0), normal(4.5, 1.0)),
                             mixture(0.15, normal(6.0, 1.5), normal(3.0, 1.0)),
                             "a tenth of the negatives score like weak positives, 15% of "
                             "the positives like strong negatives"),
    "openi-saturated": ScoreModel(normal(2.0, 1.5), normal(14.0, 4.0),
                                  "confident positives: most are the float32 score 1.0"),
    "openi-weak": ScoreModel(normal(1.5, 1.2), normal(4.5, 1.5),
                             "weaker separation (AUROC about 0.95)"),
    "openi-skewed": ScoreModel(skewed(0.5, 2.0, 0.8, 1.0), skewed(9.0, 2.0, 1.2, -1.0),
                               "gamma-shaped log-odds, each class's long tail towards the "
                               "other"),
    "openi-bimodal": ScoreModel(mixture(0.5, normal(1.5, 1.0), normal(-4.0, 1.5)),
                                normal(6.0, 1.5), "half the negatives a confident no "
                                "(0.02), half between 0.5 and 0.99"),
    "openi-uniform": ScoreModel(probability(0.5, 0.99), near_one(2.0, 6.0),
                                "negatives uniform on [0.5, 0.99], positives 1 - 10^-U(2, 6)"),
}


def synthetic_data(model: ScoreModel, reports: int = 290, seed: int = 0,
                   prevalence: dict[str, float] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(label rows, truth) of `reports` reports for each condition of `prevalence`, with
    at least two positives per condition (the split needs two to stratify). Scores are what
    an engine returns: the float32 sigmoid of the drawn log-odds, so the most confident
    positives are exactly 1.0."""
    rng = np.random.default_rng(seed)
    ids = [f"r{i:05d}" for i in range(reports)]
    labels, truths = [], []
    for condition, rate in (prevalence or OPENI_PREVALENCE).items():
        y = (rng.random(reports) < rate).astype(int)
        while y.sum() < 2:
            y[rng.integers(reports)] = 1
        z = np.where(y == 1, model.positive(rng, reports), model.negative(rng, reports))
        score = (1.0 / (1.0 + np.exp(-z.astype(np.float32)))).astype(np.float32).astype(float)
        labels.append(pd.DataFrame({"report_id": ids, "condition": condition, "level": None,
                                    "score": score}))
        truths.append(pd.DataFrame({"report_id": ids, "condition": condition, "level": "",
                                    "label": y}))
    rows = pd.concat(labels, ignore_index=True).assign(
        method="direct", model="synthetic", engine="synthetic", prompt_hash="synthetic",
        definition_hash="synthetic")
    return rows, pd.concat(truths, ignore_index=True)


def synthetic_results(model: ScoreModel, datasets: int, repeats: int, reports: int,
                      methods: list[str], fraction: float = 0.3) -> pd.DataFrame:
    """compare_methods over `datasets` seeded synthetic sets, `repeats` splits each, as one run
    `synthetic` whose splits are numbered through (data set d's are d * repeats + r)."""
    frames = []
    for seed in range(datasets):
        rows, truth = synthetic_data(model, reports, seed)
        results = compare_methods({"synthetic": rows}, truth, methods, repeats, fraction)
        frames.append(results.assign(split=results["split"] + seed * repeats))
    return pd.concat(frames, ignore_index=True)


# --- Command line -------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], metavar="NAME=PATH",
                        help="a labelling job's output folder under a name; repeat per run")
    parser.add_argument("--truth", nargs="+", help="hand-label CSV file(s) (with --run)")
    parser.add_argument("--synthetic", choices=sorted(SCENARIOS), action="append", default=[],
                        help="seeded synthetic runs of this scenario instead of --run")
    parser.add_argument("--datasets", type=int, default=5, help="synthetic data sets")
    parser.add_argument("--reports", type=int, default=290,
                        help="hand-labelled reports per synthetic data set")
    parser.add_argument("--repeats", type=int, default=50, help="seeded splits per data set")
    parser.add_argument("--calibration-fraction", type=float, default=0.3)
    parser.add_argument("--methods", nargs="+", default=list(THRESHOLD_METHODS),
                        choices=list(THRESHOLD_METHODS))
    parser.add_argument("--oracle", action="store_true",
                        help="add the best threshold on each evaluation part (the ceiling)")
    parser.add_argument("--by-question", action="store_true",
                        help="print the per-question table for synthetic runs too")
    parser.add_argument("--csv", help="also write every (split, question, method) row here")
    parser.add_argument("--s3-endpoint", default=None)
    args = parser.parse_args(argv)
    if args.oracle:
        args.methods = [*args.methods, ORACLE]
    return args


def print_summary(title: str, results: pd.DataFrame, by_question: bool = True) -> None:
    per_question, overall = summarise(results)
    splits = results.groupby(["run", "condition", "level"])["split"].nunique()
    print(f"\n## {title}: balanced accuracy on the evaluation parts, mean ± sd over "
          f"{int(splits.min())}-{int(splits.max())} splits per question\n")
    if by_question:
        print(per_question.to_string())
        print()
    print(overall.to_string(float_format=lambda v: f"{v:.4f}"))


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    frames = []
    if args.run:
        from ray_app.evaluation.review import load_truth
        from ray_app.pipeline.report_tables import read_label_rows

        if not args.truth:
            raise SystemExit("--run needs --truth")
        truth = load_truth(args.truth)
        runs = {}
        for pair in args.run:
            name, _, path = pair.partition("=")
            runs[name] = read_label_rows(path, args.s3_endpoint)
        started = time.perf_counter()
        results = compare_methods(runs, truth, args.methods, args.repeats,
                                  args.calibration_fraction)
        print_summary(f"{', '.join(runs)} ({time.perf_counter() - started:.0f} s)", results)
        frames.append(results.assign(scenario="runs"))
    for scenario in args.synthetic:
        started = time.perf_counter()
        results = synthetic_results(SCENARIOS[scenario], args.datasets, args.repeats,
                                    args.reports, args.methods, args.calibration_fraction)
        print_summary(f"synthetic {scenario} ({SCENARIOS[scenario].doc}), {args.datasets} "
                      f"data sets of {args.reports} reports "
                      f"({time.perf_counter() - started:.0f} s)",
                      results, args.by_question)
        frames.append(results.assign(scenario=scenario))
    if not frames:
        raise SystemExit("give --run NAME=PATH --truth FILE, or --synthetic SCENARIO")
    if args.csv:
        pd.concat(frames, ignore_index=True).to_csv(args.csv, index=False)


if __name__ == "__main__":
    main(sys.argv[1:])
