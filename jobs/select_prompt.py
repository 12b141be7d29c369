"""Score every prompt variant of a YAML file on hand-labelled calibration reports, rank them, and
calibrate the winner: its prompt hash flows into the calibration file. `--prompts` also takes
built-in variants by name, alone or beside files (`--prompts configs/prompt_variants.yaml
report_first`).

    python jobs/select_prompt.py --prompts configs/prompt_variants.yaml \
        --input calibration_reports.csv --truth calibration_labels.csv \
        --conditions fracture --out select/ --model qwen2.5-coder-1.5b-instruct
    ray job submit --working-dir . -- python jobs/select_prompt.py --prompts ... --engine vllm

Each variant is labelled by the labelling job into OUT/variants/NAME (resumable), the ranking goes
to OUT/ranking.csv, and OUT/calibration.json is the winner's calibration. Then label the archive
with --prompt FILE --prompt-name WINNER --calibration OUT/calibration.json.

Prompt ensembles (the mean of the variants' log-odds) are ranked too: every combination of 2 or 3
of the best 4 variants, into OUT/combinations.csv. The best combination is printed next to the
best single variant; when it ranks higher, OUT/combination/ holds its label table and
OUT/combination_calibration.json its calibration: label the archive with each member, combine
them with jobs/combine_runs.py --calibration OUT/combination_calibration.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd

from ray_app.evaluation.calibration import build_calibration, describe
from ray_app.evaluation.prompt_selection import (
    combination_is_better,
    combination_members,
    combine_label_rows,
    rank_combinations,
    rank_variants,
)
from ray_app.evaluation.review import load_truth
from ray_app.labelling.prompts import PromptError, load_prompt_variants
from ray_app.pipeline.cli import run_job
from ray_app.pipeline.label_job import run_label_job
from ray_app.pipeline.report_tables import read_label_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from combine_runs import write_ensemble  # noqa: E402
from label_reports import build_config  # noqa: E402
from label_reports import parse_args as label_args


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", nargs="+", required=True,
                        help="YAML list(s) of prompt variants and/or built-in variant names "
                             "(paper, report_first)")
    parser.add_argument("--truth", nargs="+", required=True, help="hand-label CSV file(s)")
    parser.add_argument("--out", required=True, help="folder for variants/, ranking, calibration")
    # everything else (--input, --conditions, --model, --engine, ...) is a labelling-job flag
    return parser.parse_known_args(argv)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, job_flags = parse_args(argv)
    out = Path(args.out)
    base = build_config(label_args([*job_flags, "--output", str(out / "variants")]))
    truth = load_truth(args.truth)
    variants = [(source, variant) for source in args.prompts
                for variant in load_prompt_variants(source)]
    names = [variant.name for _, variant in variants]
    if len(set(names)) != len(names):
        raise PromptError(f"--prompts {' '.join(args.prompts)}: variant names must be unique "
                          f"across them, got {names}")
    results = {}
    for source, variant in variants:
        cfg = replace(base, output=str(out / "variants" / variant.name), prompt=source,
                      prompt_name=variant.name)
        run_label_job(cfg)
        results[variant.name] = read_label_rows(cfg.output)
    ranking = rank_variants(results, truth)
    ranking.to_csv(out / "ranking.csv", index=False)
    winner = ranking["variant"][0]
    calibration = build_calibration(results[winner], truth)
    calibration.save(out / "calibration.json")
    print(ranking.to_string(index=False))
    print(f"\nchosen: {winner} (prompt hash {ranking['prompt_hash'][0]})")
    print(describe(calibration))
    print(select_combination(results, truth, ranking, out))


def select_combination(results: dict, truth, ranking, out: Path) -> str:
    """Rank the combinations of the best variants (OUT/combinations.csv) and, when the best one
    ranks above the best single variant, write its label table and calibration. Returns what
    to print: the two side by side and what to do."""
    combinations = rank_combinations(results, truth, ranking)
    combinations.to_csv(out / "combinations.csv", index=False)
    if combinations.empty:
        return "\nno combination to rank (one variant)"
    best, single = combinations.iloc[0], ranking.iloc[0]
    columns = ["variant", "prompt_hash", "mean_auroc", "min_auroc", "mean_eer"]
    side_by_side = pd.concat([ranking.iloc[[0]][columns].assign(kind="best single"),
                              combinations.iloc[[0]][columns].assign(kind="best combination")])
    lines = ["", combinations.to_string(index=False), "", side_by_side.to_string(index=False)]
    if not combination_is_better(best, single):
        kept = f"kept the single variant {single['variant']}: no combination ranks above it"
        return "\n".join([*lines, kept])
    members = combination_members(best, ranking)
    rows = combine_label_rows({m: results[m] for m in members})
    write_ensemble(rows, str(out / "combination"), [str(out / "variants" / m) for m in members])
    calibration = build_calibration(rows, truth)
    calibration.save(out / "combination_calibration.json")
    chosen = (f"chosen combination: {best['variant']} (prompt hash {best['prompt_hash']}), "
              f"above the single variant {single['variant']}; labels in {out / 'combination'}, "
              f"calibration in {out / 'combination_calibration.json'}. Label the archive with "
              f"each of {', '.join(members)}, then jobs/combine_runs.py --labels <their "
              f"folders> --calibration {out / 'combination_calibration.json'}")
    return "\n".join([*lines, chosen, describe(calibration)])


if __name__ == "__main__":
    run_job(main)
