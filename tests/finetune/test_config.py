"""Fine-tuning config: YAML files and `--set` overrides."""

import importlib.util
from pathlib import Path

import pytest

from ray_app.finetune.config import FinetuneConfig

JOBS = Path(__file__).resolve().parents[2] / "jobs"
# By path: the name `finetune` is this test package's own in a full run.
_spec = importlib.util.spec_from_file_location("finetune_job", JOBS / "finetune.py")
_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_job)
build_config = _job.build_config

CONFIG = str(JOBS.parent / "configs" / "finetune_labeller.yaml")


def test_set_overrides_are_typed_like_the_fields():
    # YAML 1.1 reads 3e-4 (no dot) as a string: the learning rate must still be a number
    cfg = build_config(["--config", CONFIG, "--set", "learning_rate=3e-4", "lora_alpha=32",
                        "max_steps=150", "conditions=[cardiomegaly]", "output=/tmp/x"])
    assert cfg.learning_rate == pytest.approx(3e-4) and isinstance(cfg.learning_rate, float)
    assert (cfg.lora_alpha, cfg.max_steps, cfg.conditions) == (32, 150, ["cardiomegaly"])
    assert cfg.weight_decay == 0.0 and cfg.mode == "labeller"


def test_bad_values_say_which_field():
    with pytest.raises(ValueError, match="learning_rate must be a number, got 'fast'"):
        FinetuneConfig.from_dict({"mode": "summary", "train_input": "a.csv", "output": "o",
                                  "learning_rate": "fast"})
    with pytest.raises(SystemExit, match="unknown fine-tuning setting"):
        build_config(["--config", CONFIG, "--set", "learnin_rate=1"])
    with pytest.raises(ValueError, match="max_failures must be -1 .* got -2"):
        FinetuneConfig(mode="summary", train_input="a.csv", output="o", max_failures=-2)
