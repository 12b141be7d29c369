"""Label radiology reports with an LLM on Ray Data.

Run with no arguments for the embedded default (sample spine MRI reports, Qwen2.5-Coder-1.5B
from pip, local Ray). Locally or on a cluster:

    python jobs/label_reports.py --input reports.csv --output out/ --conditions spinal_cancer
    ray job submit --working-dir . -- python jobs/label_reports.py --config configs/label_archive.yaml
"""

from __future__ import annotations

import argparse
import logging

from ray_app.pipeline.cli import run_job
from ray_app.pipeline.config_cli import config_from_args, config_parser
from ray_app.pipeline.label_job import LabelJobConfig, run_label_job


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Every LabelJobConfig field is a flag (engine settings by their own name: --model,
    --batch-size), plus --config YAML and --set engine.x=VALUE (ray_app.pipeline.config_cli)."""
    return config_parser(LabelJobConfig, __doc__.split("\n\n")[0]).parse_args(argv)


def build_config(args: argparse.Namespace) -> LabelJobConfig:
    return config_from_args(LabelJobConfig, args,
                            missing_hint="; or run with no arguments for the embedded default")


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv:
        from ray_app.pipeline.embedded_default import run_embedded_default

        run_embedded_default("ray_app_output/sample")
        return
    # Errors end in one line (ray_app.pipeline.cli): an engine that kept dying (EngineFailedError) as
    # "failed" with its cause, not Ray's traceback of the dead actor.
    print(run_label_job(build_config(parse_args(argv))))


if __name__ == "__main__":
    run_job(main)
