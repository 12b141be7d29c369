"""The training loop without Ray (one process): data order across workers, the labeller's
held-out yes/no metrics, ROUGE of generated impressions, gradient checkpointing, bf16."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from synthetic import write_reports, write_unsure_prompt

from ray_app.finetune.config import FinetuneConfig
from ray_app.finetune.ray_job import (
    PROVENANCE_FILE,
    _prompt_provenance,
    build_examples,
    prepare_data,
    read_init_adapter,
)
from ray_app.finetune.train import (
    LocalContext,
    load_tokenizer,
    make_schedule,
    train_worker,
)
from ray_app.labelling.conditions import load_conditions
from ray_app.labelling.prompts import (
    DEFINITIONS_FIRST_TEMPLATE,
    REPORT_FIRST_TEMPLATE,
    bind_conditions,
)


def _config(**overrides) -> FinetuneConfig:
    settings = dict(mode="summary", train_input="-", output="-", epochs=2, batch_size=2,
                    dtype="float32")
    return FinetuneConfig(**{**settings, **overrides})


def test_schedule_gives_every_worker_the_same_number_of_steps():
    cfg = _config(batch_size=2, grad_accumulation=2)
    one = make_schedule(11, cfg, rank=0, world=1)
    assert len(one.steps) == 2 * 3 and one.epoch_of_step == [0, 0, 0, 1, 1, 1]
    assert sorted(i for step in one.steps[:3] for mb in step for i in mb) == list(range(11))
    w0, w1 = (make_schedule(11, cfg, rank=r, world=2) for r in (0, 1))
    assert len(w0.steps) == len(w1.steps) == 2 * 2  # 5 examples each: 3 micro-batches, 2 steps
    epoch0 = [i for w in (w0, w1) for step in w.steps[:2] for mb in step for i in mb]
    assert len(epoch0) == len(set(epoch0)) == 10  # disjoint shards, one example left out
    assert len(make_schedule(11, _config(max_steps=4), 0, 1).steps) == 4
    with pytest.raises(ValueError, match="cannot feed 2 workers"):
        make_schedule(1, cfg, 0, 2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_reports(tmp_path_factory.mktemp("reports"), 8)


def _train(cfg: FinetuneConfig, tmp_path, start=None):
    train, heldout, info = prepare_data(cfg, load_tokenizer(cfg.model))
    return train_worker(cfg, train, heldout, LocalContext(tmp_path), start), info


def test_labeller_heldout_metrics_before_and_after(data, tiny_model_dir, tmp_path):
    reports, truth = data
    cfg = _config(mode="labeller", train_input=str(reports), train_labels=str(truth),
                  eval_input=str(reports), eval_labels=str(truth), model=str(tiny_model_dir),
                  conditions=["cardiomegaly", "pleural_effusion"], learning_rate=1e-2,
                  epochs=3, batch_size=4)
    state, info = _train(cfg, tmp_path)
    assert info["train"]["examples"] == 16 and info["train"]["target_tokens"] == 16
    before, after = state.eval_before, state.eval_after
    assert before["target_tokens"] == after["target_tokens"] == 16  # one answer token each
    assert after["loss"] < before["loss"]
    for condition in ("cardiomegaly", "pleural_effusion"):
        assert before["labeller"][condition]["n"] == 8
        assert after["labeller"][condition]["positives"] == 4
        assert 0.0 <= after["labeller"][condition]["auroc"] <= 1.0


def test_training_goes_on_from_an_earlier_adapter(data, tiny_model_dir, tmp_path):
    reports, truth = data
    settings = {"mode": "labeller", "train_input": str(reports), "train_labels": str(truth),
                "eval_input": str(reports), "eval_labels": str(truth),
                "model": str(tiny_model_dir), "conditions": ["cardiomegaly", "pleural_effusion"],
                "learning_rate": 1e-2, "batch_size": 4,
                "lora_dropout": 0.0}  # at this rate, some dropout draws diverge
    first, _ = _train(_config(**settings, epochs=3, lora_alpha=32), tmp_path / "first")
    adapter = max((tmp_path / "first").glob("step-*")) / "adapter"
    (adapter / PROVENANCE_FILE).write_text(json.dumps({"base_model": str(tiny_model_dir)}))

    cfg = _config(**settings, epochs=1, init_adapter=str(adapter))  # lora_alpha left at 8
    start, info = read_init_adapter(cfg)
    second, _ = _train(cfg, tmp_path / "second", start)
    # The second run starts where the first ended (a fresh LoRA starts at the base model's loss).
    assert second.eval_before["loss"] == pytest.approx(first.eval_after["loss"], rel=1e-5)
    assert first.eval_before["loss"] > 1.5 * first.eval_after["loss"]
    assert info["lora"]["lora_alpha"] == 32 and info["base_model"] == str(tiny_model_dir)

    with pytest.raises(ValueError, match="trained on base model .* set model to"):
        read_init_adapter(_config(**{**settings, "model": "smollm2-135m-instruct"},
                                  init_adapter=str(adapter)))
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        read_init_adapter(_config(**settings, init_adapter=str(tmp_path)))


def test_training_pads_batches_to_the_multiple_without_changing_the_loss(
        data, tiny_model_dir, tmp_path, monkeypatch):
    import torch

    from ray_app.finetune import train as train_module

    reports, truth = data
    widths = []
    collate = train_module.collate

    def recording(examples, pad, multiple=None):
        batch = collate(examples, pad, multiple)
        widths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(train_module, "collate", recording)
    cfg = _config(mode="labeller", train_input=str(reports), train_labels=str(truth),
                  model=str(tiny_model_dir), conditions=["cardiomegaly", "pleural_effusion"],
                  epochs=1, batch_size=4, max_steps=1, pad_to_multiple_of=64)
    train, _, _ = prepare_data(cfg, load_tokenizer(cfg.model))
    _train(cfg, tmp_path)
    assert widths and all(w % 64 == 0 for w in widths)  # the job passes its setting

    losses = {}
    for multiple in (1, 64):  # the same step from the same seeded LoRA: the padding is masked
        model, tokenizer = train_module.load_base(cfg.model)
        model = train_module.add_lora(model, cfg)
        optimizer, scheduler = train_module._optimizer(model, cfg, None)
        step = train_module.make_schedule(len(train), cfg, 0, 1).steps[0]
        losses[multiple] = train_module._optimizer_step(
            model, optimizer, scheduler, step, train, train_module.pad_id(tokenizer),
            LocalContext(tmp_path), torch.float32, pad_to_multiple_of=multiple)["loss"]
    longest, padded = widths[-2:]
    assert padded % 64 == 0 and longest < padded < longest + 64
    assert losses[64] == pytest.approx(losses[1], rel=1e-5)


def test_labeller_trains_on_the_wording_its_conditions_label_with(data):
    reports, truth = data  # chest conditions: their YAMLs ask for definitions_first
    cfg = _config(mode="labeller", train_input=str(reports), train_labels=str(truth),
                  conditions=["cardiomegaly", "pleural_effusion"])
    conditions = load_conditions(cfg.conditions)
    bound = bind_conditions(DEFINITIONS_FIRST_TEMPLATE, conditions)
    examples, _ = build_examples(cfg, str(reports), str(truth))
    system = examples[0].prompt[0]["content"]
    assert all(c.definition in system for c in conditions)  # the definitions bound
    assert system.startswith(bound.system.split("{report}")[0])
    assert _prompt_provenance(cfg)["prompt_hash"] == bound.template_hash("direct")
    # Another wording by name (--prompt): the examples and the provenance follow it.
    cfg = replace(cfg, prompt="report_first")
    examples, _ = build_examples(cfg, str(reports), str(truth))
    system = examples[0].prompt[0]["content"]
    assert system.startswith(REPORT_FIRST_TEMPLATE.system.split("{report}")[0])
    assert _prompt_provenance(cfg)["prompt_hash"] == REPORT_FIRST_TEMPLATE.template_hash("direct")


def test_impression_rouge_and_gradient_checkpointing(data, tiny_model_dir, tmp_path):
    pytest.importorskip("rouge_score", reason="pip install rouge-score")
    reports, _ = data
    cfg = _config(mode="impression", train_input=str(reports), eval_input=str(reports),
                  model=str(tiny_model_dir), learning_rate=1e-2, epochs=4, batch_size=4,
                  eval_generate=4, max_new_tokens=8, gradient_checkpointing=True)
    state, _ = _train(cfg, tmp_path)
    assert set(state.eval_after["rouge"]) == {"rouge1", "rouge2", "rougeL"}
    assert state.eval_after["rouge"]["rouge1"] > state.eval_before["rouge"]["rouge1"]
    assert state.eval_after["loss"] < state.eval_before["loss"]


def test_bf16_base_with_fp32_lora_weights_learns(data, tiny_model_dir, tmp_path, monkeypatch):
    import torch

    from ray_app.finetune import train as train_module

    reports, truth = data
    kept = {}
    add_lora = train_module.add_lora

    def keep_model(model, cfg, start=None):
        kept["model"] = add_lora(model, cfg, start)
        return kept["model"]

    monkeypatch.setattr(train_module, "add_lora", keep_model)
    cfg = _config(mode="labeller", train_input=str(reports), train_labels=str(truth),
                  eval_input=str(reports), eval_labels=str(truth), model=str(tiny_model_dir),
                  conditions=["cardiomegaly", "pleural_effusion"], learning_rate=1e-2,
                  epochs=3, batch_size=4, dtype="bfloat16")
    state, _ = _train(cfg, tmp_path)
    assert state.dtype == "bfloat16"
    assert state.eval_after["loss"] < state.eval_before["loss"]
    named = dict(kept["model"].named_parameters())
    lora = {n: p.dtype for n, p in named.items() if "lora_" in n}
    base = {n: p.dtype for n, p in named.items() if "lora_" not in n}
    assert lora and set(lora.values()) == {torch.float32}  # the trained weights keep fp32 steps
    assert set(base.values()) == {torch.bfloat16}


def test_dtype_is_checked():
    with pytest.raises(ValueError, match="dtype 'fp8' is not one of"):
        _config(dtype="fp8")


def test_labeller_heldout_scores_count_the_wordings_unsure_answer_against_yes(
        data, tiny_model_dir, tmp_path):
    """A wording with an unsure answer: held-out scores are p(yes) / (p(yes) + p(no) +
    p(unsure)), what the label job will score, not the yes/no split of the same logits."""
    import torch

    from ray_app.finetune.evaluation import heldout_pass, labeller_metrics
    from ray_app.finetune.ray_job import labeller_unsure
    from ray_app.finetune.train import load_base, pad_id
    from ray_app.labelling.scoring import answer_tokens

    reports, truth = data
    prompt = write_unsure_prompt(tmp_path)
    settings = dict(mode="labeller", train_input=str(reports), train_labels=str(truth),
                    eval_input=str(reports), eval_labels=str(truth), model=str(tiny_model_dir),
                    conditions=["cardiomegaly", "pleural_effusion"])
    cfg = _config(**settings, prompt=str(prompt))
    tokenizer = load_tokenizer(cfg.model)
    assert labeller_unsure(cfg, tokenizer) == "fracture"
    assert labeller_unsure(_config(**settings), tokenizer) == ""  # the conditions' yes/no prompt
    with pytest.raises(ValueError, match="maybe"):  # five tokens here: refused on the driver
        labeller_unsure(_config(**settings, prompt="definitions_first_maybe"), tokenizer)

    _, heldout, _ = prepare_data(cfg, tokenizer)
    model, _ = load_base(cfg.model)
    cpu, pad = torch.device("cpu"), pad_id(tokenizer)
    with_unsure = heldout_pass(model, heldout, 4, pad, cpu,
                               answer_tokens(tokenizer, "fracture")).scores
    yes_no = heldout_pass(model, heldout, 4, pad, cpu, answer_tokens(tokenizer)).scores
    assert with_unsure.keys() == yes_no.keys() and len(yes_no) == 16
    assert all(with_unsure[k] < yes_no[k] for k in yes_no)
    # The training run's evaluator gets the word through train_worker: before the first step
    # (a fresh LoRA adds nothing) its metrics are those of the unsure scores above.
    state = train_worker(replace(cfg, max_steps=1), heldout[:4], heldout,
                         LocalContext(tmp_path / "run"), unsure="fracture")
    yes = answer_tokens(tokenizer).yes_ids
    truth = {e.example_id: int(e.labels[-1] in yes) for e in heldout}
    got = state.eval_before["labeller"]
    for condition, expected in labeller_metrics(with_unsure, truth).items():
        assert got[condition]["mean_score"] == pytest.approx(expected["mean_score"], rel=1e-5)
        assert got[condition]["auroc"] == pytest.approx(expected["auroc"])
        assert got[condition]["mean_score"] < labeller_metrics(yes_no, truth)[condition][
            "mean_score"] - 1e-3
