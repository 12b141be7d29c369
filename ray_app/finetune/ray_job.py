"""The fine-tuning job on Ray Train: data prepared on the driver, `train.train_worker` run by
data-parallel `TorchTrainer` workers, the adapter exported with its provenance.

Resumable: checkpoints go to `<storage_path>/<run_name>`; rerunning the same config after a
kill restores Ray Train's record of them and the workers continue from the latest step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ray_app.finetune import datasets
from ray_app.finetune.config import FinetuneConfig
from ray_app.finetune.masking import TokenisedExample, tokenise_all
from ray_app.finetune.train import (
    ADAPTER_DIR,
    OPTIMIZER_FILE,
    STATE_FILE,
    checkpoint_complete,
    train_worker,
)
from ray_app.pipeline import placement
from ray_app.pipeline.ray_session import ensure_ray
from ray_app.provenance import ADAPTER_PROVENANCE, code_version, utc_now

log = logging.getLogger(__name__)

#: What a checkpoint folder holds once complete: a resume reads all three.
CHECKPOINT_FILES = (STATE_FILE, OPTIMIZER_FILE,
                    os.path.join(ADAPTER_DIR, "adapter_model.safetensors"))

PROVENANCE_FILE = ADAPTER_PROVENANCE


def build_examples(cfg: FinetuneConfig, reports_uri: str, labels_uri: str | None
                   ) -> tuple[list[datasets.TextExample], datasets.BuildReport]:
    """The mode's examples from one report table (and its labels, for the labeller)."""
    reports = datasets.read_reports(reports_uri, cfg.id_column, cfg.text_column, cfg.limit)
    if cfg.mode == "summary":
        return datasets.summary_examples(reports, cfg.summary_kinds)
    if cfg.mode == "impression":
        return datasets.impression_examples(reports)
    labels = datasets.read_labels(labels_uri or "")
    return datasets.labeller_examples(reports, labels, *_labeller_prompt(cfg))


def prepare_data(cfg: FinetuneConfig, tokenizer: Any
                 ) -> tuple[list[TokenisedExample], list[TokenisedExample], dict[str, Any]]:
    """Tokenised training and held-out examples, and what the builders reported."""
    info: dict[str, Any] = {}
    splits: dict[str, list[TokenisedExample]] = {"train": [], "eval": []}
    sources = {"train": (cfg.train_input, cfg.train_labels),
               "eval": (cfg.eval_input, cfg.eval_labels)}
    for split, (reports_uri, labels_uri) in sources.items():
        if reports_uri is None:
            continue
        examples, report = build_examples(cfg, reports_uri, labels_uri)
        splits[split], counts = tokenise_all(tokenizer, examples, cfg.max_length,
                                             cfg.prompt_head_tokens)
        info[split] = {"input": reports_uri, "build": report.summary(), **counts,
                       "examples": len(splits[split]),
                       "target_tokens": sum(e.target_tokens for e in splits[split])}
        log.info("%s data: %s; %s", split, report.summary(), counts)
    if not splits["train"]:
        raise ValueError(f"no training examples from {cfg.train_input}: {info['train']['build']}")
    return splits["train"], splits["eval"], info


def _worker_entry(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    import ray
    import torch

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    cfg = FinetuneConfig.from_dict(config["cfg"])
    placement.record_placement("finetune-worker")
    ctx = RayWorkerContext(config["use_gpu"], config.get("run_dir"))
    if ctx.device.type == "cpu":
        threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // cfg.num_workers)
        torch.set_num_threads(threads)
    start = ray.get(config["start"]) if config.get("start") is not None else None
    train_worker(cfg, ray.get(config["train"]), ray.get(config["eval"]), ctx, start,
                 unsure=config.get("unsure", ""))


class RayWorkerContext:
    """WorkerContext on Ray Train: rank, device and DDP from Ray, checkpoints to its storage."""

    def __init__(self, use_gpu: bool, run_dir: str | None = None) -> None:
        import ray.train

        self.run_dir = run_dir

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = placement.worker_device(use_gpu)

    def wrap(self, model: Any) -> Any:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=self.device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = f"step-{metrics['step']:08d}" if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def resume_dir(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return _unrecorded_checkpoint(self.run_dir)
        return checkpoint.to_directory(tempfile.mkdtemp(prefix="ray_app_resume_"))

    def gather(self, value: Any) -> list[Any]:
        import torch.distributed as dist

        if not dist.is_initialized() or self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def run_folder(cfg: FinetuneConfig) -> str:
    """Where Ray Train keeps this run's checkpoints (a rerun with the same name resumes)."""
    storage = os.path.abspath(cfg.storage_path or os.path.join(cfg.output, "ray_train"))
    return os.path.join(storage, cfg.run_name)


def _unrecorded_checkpoint(run_dir: str | None) -> str | None:
    """The newest complete checkpoint folder of a run whose Ray Train record names none: a job
    killed after a checkpoint's files reached storage but before Ray recorded it would otherwise
    start again from step 0. Complete: its manifest's files all there, whole (a kill while Ray
    copied it can leave a file cut short). Local (or mounted) storage only."""
    if not run_dir or not os.path.isdir(run_dir):
        return None
    for folder in sorted(Path(run_dir).glob("step-*"), reverse=True):
        if checkpoint_complete(folder, CHECKPOINT_FILES):
            log.warning("Ray Train recorded no checkpoint for %s; resuming from %s, the newest "
                        "complete checkpoint folder there", run_dir, folder)
            return str(folder)
    return None


def worker_placement(cfg: FinetuneConfig):
    """Training workers' resources from the configuration (ray_app/pipeline/placement.py): `use_gpu`
    true asks for a GPU per worker whatever the cluster holds now; None decides by what the
    cluster has or its autoscaler can reach."""
    return placement.place(placement.device_for(cfg.use_gpu), cpus_per_worker=cfg.cpus_per_worker,
                           max_workers=cfg.num_workers)


def make_trainer(cfg: FinetuneConfig, train: list[TokenisedExample],
                 heldout: list[TokenisedExample], where=None,
                 start: dict[str, bytes] | None = None, unsure: str = ""):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    where = where or worker_placement(cfg)
    run_dir = run_folder(cfg)  # on the driver: a worker's working directory may differ
    storage, name = os.path.split(run_dir)
    return TorchTrainer(
        _worker_entry,
        train_loop_config={"cfg": asdict(cfg), "train": ray.put(train), "eval": ray.put(heldout),
                           "use_gpu": where.use_gpu, "run_dir": run_dir,
                           "start": ray.put(start) if start else None, "unsure": unsure},
        torch_config=TorchConfig(backend=placement.ddp_backend(where.use_gpu)),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=where.use_gpu,
                                     resources_per_worker=where.worker_resources()),
        run_config=RunConfig(name=name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Prepare data, train on Ray, write <output>/adapter with its provenance; returns it."""

    from ray_app.finetune.train import load_tokenizer

    started, started_at = time.monotonic(), utc_now()
    start, start_info = read_init_adapter(cfg)
    tokenizer = load_tokenizer(cfg.model)
    train, heldout, data_info = prepare_data(cfg, tokenizer)
    unsure = labeller_unsure(cfg, tokenizer)
    ensure_ray()
    where = worker_placement(cfg)
    result = make_trainer(cfg, train, heldout, where, start, unsure).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint: {result.error}")
    provenance = {
        "base_model": cfg.model, "mode": cfg.mode, "config": asdict(cfg), "data": data_info,
        "workers": cfg.num_workers, "device": "cuda" if where.use_gpu else "cpu",
        "started_at": started_at, "finished_at": utc_now(),
        "seconds": round(time.monotonic() - started, 1), "code_version": code_version(),
        "versions": _versions(), **_prompt_provenance(cfg), "init_adapter": start_info,
    }
    adapter = export_adapter(result.checkpoint, cfg.output, provenance)
    if cfg.merge:
        merge_adapter(cfg.model, adapter, os.path.join(cfg.output, "merged"))
    return json.loads((Path(adapter) / PROVENANCE_FILE).read_text())


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def read_init_adapter(cfg: FinetuneConfig) -> tuple[dict[str, bytes] | None, dict | None]:
    """The files of `init_adapter` (sent to the workers) and what its provenance says of it,
    after checking that it exists and was trained on this run's base model."""
    if not cfg.init_adapter:
        return None, None
    folder = Path(cfg.init_adapter)
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"init_adapter {folder} has no {', '.join(missing)}: give the "
                                f"adapter/ folder of an earlier fine-tuning run's output")
    earlier = folder / PROVENANCE_FILE
    provenance = json.loads(earlier.read_text()) if earlier.is_file() else {}
    base = provenance.get("base_model")
    if base is not None and base != cfg.model:
        raise ValueError(f"init_adapter {folder} was trained on base model {base!r}, this run's "
                         f"model is {cfg.model!r}: set model to {base!r} or start fresh")
    if provenance.get("prompt_hash") not in (None, _prompt_provenance(cfg).get("prompt_hash")):
        log.warning("init_adapter %s was trained on another prompt wording than this run's "
                    "conditions use; its labels will follow this run's", folder)
    lora = json.loads((folder / "adapter_config.json").read_text())
    info = {"path": str(folder.resolve()), "base_model": base, "steps": provenance.get("steps"),
            "data": provenance.get("data"),
            "lora": {k: lora.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}}
    return {name: (folder / name).read_bytes() for name in ADAPTER_FILES}, info


def export_adapter(checkpoint, output: str, provenance: dict[str, Any]) -> str:
    """Copy the final checkpoint's adapter to <output>/adapter, with the run's progress
    (steps, per-step loss and tokens/s, evaluation before/after) in its provenance file."""
    target = Path(output) / ADAPTER_DIR
    with checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / STATE_FILE).read_text())
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(Path(folder) / ADAPTER_DIR, target)
    final = state["history"][-1] if state["history"] else {}
    provenance = {**provenance, "steps": state["step"], "world_size": state["world_size"],
                  "dtype": state.get("dtype"),
                  "resumed_from": state["resumed_from"],
                  "eval_before": state["eval_before"], "eval_after": state["eval_after"],
                  "final_step": final,
                  "history": state["history"]}
    (target / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str))
    log.info("adapter written to %s (%d steps)", target, state["step"])
    return str(target)


def merge_adapter(model_spec: str, adapter: str, target: str) -> None:
    """Base + adapter as one Hugging Face model folder (fp32), for engines without LoRA."""
    from peft import PeftModel

    from ray_app.finetune.train import load_base

    model, tokenizer = load_base(model_spec)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    shutil.copy(Path(adapter) / PROVENANCE_FILE, Path(target) / PROVENANCE_FILE)
    log.info("merged model written to %s", target)


def _labeller_prompt(cfg: FinetuneConfig):
    """The labeller's conditions and the wording the label job will ask them with."""
    from ray_app.labelling.conditions import load_conditions
    from ray_app.labelling.prompts import run_prompt

    conditions = load_conditions(cfg.conditions)
    return conditions, run_prompt(conditions, cfg.prompt)


def labeller_unsure(cfg: FinetuneConfig, tokenizer: Any) -> str:
    """The unsure answer ('maybe') the labeller's wording offers, '' for yes/no: held-out
    scores then count it against yes, as the label job will. Checked against the tokenizer on
    the driver, so a word it cannot score stops the job before any worker loads the model."""
    if cfg.mode != "labeller":
        return ""
    from ray_app.labelling.scoring import answer_tokens

    unsure = _labeller_prompt(cfg)[1].unsure_answer
    answer_tokens(tokenizer, unsure)
    return unsure


def _prompt_provenance(cfg: FinetuneConfig) -> dict[str, Any]:
    """Labeller: the prompt and definitions trained on (labels from the adapter are only
    meaningful with the same ones)."""
    if cfg.mode != "labeller":
        return {}
    conditions, template = _labeller_prompt(cfg)
    return {"prompt_hash": template.template_hash("direct"),
            "definition_hashes": {c.name: c.definition_hash() for c in conditions}}


def _versions() -> dict[str, str]:
    import peft
    import ray
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "ray": ray.__version__}
