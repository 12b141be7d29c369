"""Label radiology reports with an LLM on Ray Data.

Run with no arguments for the embedded default (sample spine MRI reports, Qwen2.5-Coder-1.5B
from pip, local Ray). Locally or on a cluster:

    python jobs/label_reports.py --input reports.csv --output out/ --conditions spinal_cancer
    ray job submit --working-dir . -- python jobs/label_reports.py --config configs/label_archive.yaml
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields

import yaml

from ray_app.engines import EngineConfig
from ray_app.pipeline.cli import InputError, run_job
from ray_app.pipeline.label_job import LabelJobConfig, run_label_job

_ENGINE_FLAGS = ("engine", "model", "dtype", "device", "batch_size", "generate_batch_size",
                 "draft_tokens", "max_context_tokens", "max_new_tokens", "repetition_penalty",
                 "cpu_threads", "adapter", "tensor_parallel_size")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML with job fields and an 'engine:' mapping")
    parser.add_argument("--output", help="output folder (local or s3://)")
    for f in fields(LabelJobConfig):
        if f.name not in ("output", "engine"):
            _add_flag(parser, f, nargs="+" if f.name == "conditions" else None)
    for f in fields(EngineConfig):
        if f.name in _ENGINE_FLAGS:
            _add_flag(parser, f, prefix="engine" if f.name == "engine" else "")
    return parser.parse_args(argv)


def _add_flag(parser, f, nargs=None, prefix=""):
    flag = "--" + (f.name if not prefix or f.name == prefix else f"{prefix}-{f.name}")
    kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
    parser.add_argument(flag.replace("_", "-"), dest=f.name, type=kind, nargs=nargs,
                        default=None, help=f.metadata.get("doc"))


def build_config(args: argparse.Namespace) -> LabelJobConfig:
    data = _read_config(args.config) if args.config else {}
    engine = data.pop("engine", {}) or {}
    if not isinstance(engine, dict):
        raise InputError(f"{args.config}: 'engine' must be a mapping of engine settings")
    engine = dict(engine)
    for name in _ENGINE_FLAGS:
        if getattr(args, name, None) is not None:
            engine[name] = getattr(args, name)
    for f in fields(LabelJobConfig):
        if f.name != "engine" and getattr(args, f.name, None) is not None:
            data[f.name] = getattr(args, f.name)
    missing = [k for k in ("input", "output", "conditions") if not data.get(k)]
    if missing:
        raise InputError(f"missing {', '.join('--' + m for m in missing)} (or run with no "
                         "arguments for the embedded default)")
    source = args.config or "the command line"
    try:
        engine_config = EngineConfig.from_dict(engine)
    except (TypeError, ValueError) as err:  # unknown or mistyped engine settings
        raise InputError(f"{source}: engine: {err}") from err
    known = {f.name for f in fields(LabelJobConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
    return LabelJobConfig(**data, engine=engine_config)


def _read_config(path: str) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config {path}: expected a mapping of job fields, got "
                         f"{type(data).__name__}")
    return data


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
