"""The fine-tuning job on Ray Train with a tiny random model: loss falls with one and with two
data-parallel workers; the adapter loads in the transformers engine, changes the scores and
leaves the base weights alone; the merged model scores as base + adapter does."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from synthetic import write_reports, write_unsure_prompt

from ray_app.engines import EngineConfig, make_engine
from ray_app.finetune.config import FinetuneConfig
from ray_app.labelling import prompts
from ray_app.labelling.conditions import condition_from_dict

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

HEART = condition_from_dict({"name": "cardiomegaly", "definition": "An enlarged heart."}, "t")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> Path:
    return write_reports(tmp_path_factory.mktemp("reports"), 16)[0]


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def runs(ray_cluster, reports, tiny_model_dir, tmp_path_factory):
    """Summary SFT with one and with two workers (fractional CPUs: two workers at 1 CPU each
    on a 2-CPU node leave Ray nothing to schedule its own tasks on)."""
    from ray_app.finetune.ray_job import run_finetune

    before = _digest(tiny_model_dir)
    out = {}
    for workers in (1, 2):
        cfg = FinetuneConfig(
            mode="summary", train_input=str(reports), eval_input=str(reports),
            output=str(tmp_path_factory.mktemp(f"run{workers}")), model=str(tiny_model_dir),
            learning_rate=1e-2, epochs=2, batch_size=2, num_workers=workers,
            cpus_per_worker=0.5, torch_threads=1, checkpoint_every=1000, merge=workers == 1,
            dtype="float32")
        out[workers] = (cfg, run_finetune(cfg))
    assert _digest(tiny_model_dir) == before, "training wrote to the base model's files"
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_loss_falls(runs, workers):
    cfg, provenance = runs[workers]
    losses = [h["loss"] for h in provenance["history"]]
    assert provenance["world_size"] == workers and provenance["dtype"] == "float32"
    assert provenance["steps"] == len(losses) == 16 // (2 * workers) * 2  # 16 examples, 2 epochs
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
    assert provenance["eval_after"]["loss"] < 0.5 * provenance["eval_before"]["loss"]
    assert all(h["tokens_per_s"] > 0 for h in provenance["history"])
    assert provenance["data"]["train"]["examples"] == 16
    adapter = Path(cfg.output) / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 8)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"}


def _conversations() -> list[prompts.Conversation]:
    reports = ["FINDINGS: The heart is enlarged.\nIMPRESSION: Cardiomegaly.",
               "FINDINGS: Heart size is normal.\nIMPRESSION: No acute disease."]
    return [prompts.direct_conversation(prompts.DEFAULT_TEMPLATE, HEART, r) for r in reports]


def test_adapter_changes_scores_and_not_base_weights(runs, tiny_model_dir, tiny_engine):
    from safetensors.torch import load_file

    adapter = Path(runs[1][0].output) / "adapter"
    assert all("lora_" in key for key in load_file(str(adapter / "adapter_model.safetensors")))
    tuned = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir), adapter=str(adapter),
                                     batch_size=4, merge_adapter=False))
    conversations = _conversations()
    base_scores = tiny_engine.score(conversations)
    tuned_scores = tuned.score(conversations)
    assert max(abs(a - b) for a, b in zip(base_scores, tuned_scores)) > 0.01
    with tuned.model.disable_adapter():  # the base weights under the adapter are untouched
        assert tuned.score(conversations) == pytest.approx(base_scores, abs=1e-5)
    folded = make_engine(EngineConfig(dtype="float32", model=str(tiny_model_dir),
                                      adapter=str(adapter), batch_size=4))  # merged at load
    assert not any("lora_" in name for name, _ in folded.model.named_parameters())
    assert folded.score(conversations) == pytest.approx(tuned_scores, abs=1e-5)
    provenance = json.loads((adapter / "training_provenance.json").read_text())
    assert provenance["base_model"] == str(tiny_model_dir) and provenance["mode"] == "summary"

    merged = make_engine(EngineConfig(dtype="float32", model=str(Path(runs[1][0].output) / "merged"),
                                      batch_size=4))
    assert merged.score(conversations) == pytest.approx(tuned_scores, abs=1e-4)


def test_a_run_goes_on_from_an_earlier_run_s_adapter(runs, tmp_path):
    """init_adapter through Ray Train: the workers get the adapter's files from the driver."""
    from dataclasses import replace

    from ray_app.finetune.ray_job import run_finetune

    first_cfg, first = runs[1]
    cfg = replace(first_cfg, output=str(tmp_path), epochs=1, merge=False,
                  init_adapter=str(Path(first_cfg.output) / "adapter"))
    provenance = run_finetune(cfg)
    assert provenance["eval_before"]["loss"] == pytest.approx(first["eval_after"]["loss"],
                                                              rel=1e-4)
    assert provenance["init_adapter"]["steps"] == first["steps"]
    assert provenance["init_adapter"]["lora"]["r"] == 16


def test_the_ray_job_scores_held_out_examples_with_the_wordings_unsure_answer(
        ray_cluster, tiny_model_dir, tmp_path):
    """The driver finds the wording's unsure answer and the Ray Train workers score with it:
    the held-out metrics match a one-process run given the word."""
    from ray_app.finetune.ray_job import labeller_unsure, prepare_data, run_finetune
    from ray_app.finetune.train import LocalContext, load_tokenizer, train_worker

    reports, truth = write_reports(tmp_path / "data", 8)
    prompt = write_unsure_prompt(tmp_path)
    cfg = FinetuneConfig(
        mode="labeller", train_input=str(reports), train_labels=str(truth),
        eval_input=str(reports), eval_labels=str(truth), model=str(tiny_model_dir),
        conditions=["cardiomegaly", "pleural_effusion"], prompt=str(prompt), max_steps=1,
        batch_size=4, num_workers=1, cpus_per_worker=0.5, torch_threads=1, merge=False,
        dtype="float32", output=str(tmp_path / "out"))
    on_ray = run_finetune(cfg)["eval_before"]["labeller"]
    tokenizer = load_tokenizer(cfg.model)
    train, heldout, _ = prepare_data(cfg, tokenizer)
    for unsure, same in (("fracture", True), ("", False)):
        local = train_worker(cfg, train, heldout, LocalContext(tmp_path / f"local{unsure}"),
                             unsure=unsure).eval_before["labeller"]
        for condition in ("cardiomegaly", "pleural_effusion"):
            match = on_ray[condition]["mean_score"] == pytest.approx(
                local[condition]["mean_score"], rel=1e-5)
            assert match == same, (unsure, condition)
    assert labeller_unsure(cfg, tokenizer) == "fracture"
