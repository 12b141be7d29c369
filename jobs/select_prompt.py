"""Score every prompt variant of a YAML file on hand-labelled calibration reports, rank them, and
calibrate the winner: its prompt hash flows into the calibration file.

    python jobs/select_prompt.py --prompts configs/prompt_variants.yaml \
        --input calibration_reports.csv --truth calibration_labels.csv \
        --conditions fracture --out select/ --model qwen2.5-coder-1.5b-instruct
    ray job submit --working-dir . -- python jobs/select_prompt.py --prompts ... --engine vllm

Each variant is labelled by the labelling job into OUT/variants/NAME (resumable), the ranking goes
to OUT/ranking.csv, and OUT/calibration.json is the winner's calibration. Then label the archive
with --prompt FILE --prompt-name WINNER --calibration OUT/calibration.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from ray_app.evaluation.calibration import build_calibration, describe
from ray_app.evaluation.prompt_selection import rank_variants
from ray_app.evaluation.review import load_truth
from ray_app.labelling.prompts import load_prompt_variants
from ray_app.pipeline.cli import run_job
from ray_app.pipeline.label_job import run_label_job
from ray_app.pipeline.report_tables import read_label_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from label_reports import build_config  # noqa: E402
from label_reports import parse_args as label_args


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", required=True, help="YAML list of prompt variants")
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
    results = {}
    for variant in load_prompt_variants(args.prompts):
        cfg = replace(base, output=str(out / "variants" / variant.name), prompt=args.prompts,
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


if __name__ == "__main__":
    run_job(main)
