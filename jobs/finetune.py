"""LoRA fine-tuning on Ray Train: summary SFT, an instruction-tuned labeller, or findings ->
impression. Locally or on a cluster:

    python jobs/finetune.py --config configs/finetune_summary.yaml
    ray job submit --working-dir . -- python jobs/finetune.py --config configs/finetune_summary.yaml

Any config field can be overridden: `--set num_workers=2 max_steps=50`. Rerunning the same
config after a kill resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging

import yaml

from ray_app.finetune.config import FinetuneConfig
from ray_app.finetune.ray_job import run_finetune
from ray_app.pipeline.cli import run_job


def build_config(argv: list[str]) -> FinetuneConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML of FinetuneConfig fields")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="override fields; values are read as YAML (2, 1e-4, [a, b], null)")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{args.config}: expected a mapping of fine-tuning settings, got "
                         f"{type(data).__name__}")
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
        data[name] = yaml.safe_load(value)
    try:
        return FinetuneConfig.from_dict(data)
    except (TypeError, ValueError) as err:  # missing or unknown fields, bad values
        raise SystemExit(f"{args.config}: {err}") from err  # ray_app.pipeline.cli: one line, exit 2


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    provenance = run_finetune(build_config(argv))
    keep = ("base_model", "mode", "steps", "resumed_from", "eval_before", "eval_after",
            "final_step", "seconds")
    print(json.dumps({k: provenance.get(k) for k in keep}, indent=2, default=str))


if __name__ == "__main__":
    run_job(main)
