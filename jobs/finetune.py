"""LoRA fine-tuning on Ray Train: summary SFT, an instruction-tuned labeller, or findings ->
impression. Locally or on a cluster:

    python jobs/finetune.py --config configs/finetune_summary.yaml
    ray job submit --working-dir . -- python jobs/finetune.py --config configs/finetune_summary.yaml

Any config field can be overridden by its flag (`--num-workers 2`) or with `--set
num_workers=2 max_steps=50`. Rerunning the same config after a kill resumes from the latest
checkpoint.
"""

from __future__ import annotations

import json
import logging

from ray_app.finetune.config import FinetuneConfig
from ray_app.finetune.ray_job import run_finetune
from ray_app.pipeline.cli import run_job
from ray_app.pipeline.config_cli import config_from_args, config_parser


def build_config(argv: list[str]) -> FinetuneConfig:
    parser = config_parser(FinetuneConfig, __doc__.split("\n\n")[0])
    try:
        return config_from_args(FinetuneConfig, parser.parse_args(argv),
                                what="fine-tuning setting")
    except ValueError as err:  # unknown fields, bad values (InputError is one)
        # SystemExit("..."), as this job always refused its arguments: one line, exit 2
        raise SystemExit(str(err)) from err


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    provenance = run_finetune(build_config(argv))
    keep = ("base_model", "mode", "steps", "resumed_from", "eval_before", "eval_after",
            "final_step", "seconds")
    print(json.dumps({k: provenance.get(k) for k in keep}, indent=2, default=str))


if __name__ == "__main__":
    run_job(main)
