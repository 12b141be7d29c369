"""Ray Train layer of the CNN fine-tuning: a TorchTrainer whose workers (DDP over gloo on CPU,
NCCL on GPUs) train on their share of each epoch's undersampled rows and report loss and
validation AUROC with a checkpoint every epoch. Rerunning with the same output folder resumes
from the latest checkpoint (Ray Train restores the run by its name and storage path)."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ray_app.evaluation.metrics import binary_metrics
from ray_app.evaluation.thresholds import eer_threshold
from ray_app.imaging.classifiers import SplitConfig, split_studies
from ray_app.imaging.cnn import (
    CNNConfig,
    ImageBatches,
    build_cnn,
    image_path,
    predict_scores,
    train_epoch,
    undersample,
)
from ray_app.pipeline import placement
from ray_app.pipeline.ray_session import ensure_ray
from ray_app.provenance import code_version, utc_now

log = logging.getLogger(__name__)

RUN_NAME = "cnn"
STATE_FILE = "state.pt"


def image_table(cfg: CNNConfig) -> pd.DataFrame:
    """image (absolute path), label, split ('train'/'validation'), grouped by study if given."""
    path = Path(cfg.images)
    frame = pd.read_parquet(path) if path.suffix in (".parquet", ".pq") else pd.read_csv(path, dtype={"study_uid": str})
    missing = {"image", "label"} - set(frame.columns)
    if missing:
        raise ValueError(f"{cfg.images} lacks column(s) {sorted(missing)}: it needs image and label")
    # Absolute: Ray Train workers run in another working directory.
    frame = frame.assign(image=[image_path(path.resolve().parent, v) for v in frame["image"]],
                         label=frame["label"].astype(int))
    groups = frame["study_uid"] if "study_uid" in frame else frame["image"]
    by_group = frame.assign(group=groups).groupby("group")["label"].max().to_dict()
    parts = split_studies(by_group, SplitConfig(validation=cfg.validation / 2,
                                                test=cfg.validation / 2, seed=cfg.seed))
    held_out = set(parts["validation"]) | set(parts["test"])
    return frame.assign(split=["validation" if g in held_out else "train" for g in groups])


def train_loop(config: dict) -> None:
    """Ray Train worker: resumes from the latest checkpoint, then one report per epoch."""
    import ray.train
    import ray.train.torch

    cfg = CNNConfig(**config["cfg"])
    table = pd.DataFrame(config["table"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    placement.record_placement("cnn-worker")
    device = placement.worker_device(config["use_gpu"])
    model = build_cnn(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    start, history = _resume(model, optimizer)
    model = ray.train.torch.prepare_model(model, move_to_device=device)
    data = ImageBatches(table["image"], table["label"].to_numpy(), cfg)
    train_rows = np.flatnonzero(table["split"] == "train")
    val_rows = np.flatnonzero(table["split"] == "validation")
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch * world + rank)  # augmentation draws
        rows = train_rows[undersample(data.labels[train_rows], cfg.negatives_per_positive,
                                      np.random.default_rng(cfg.seed + epoch))]
        loss = train_epoch(model, data, rows[rank::world], optimizer, device)
        scores = predict_scores(model, data, val_rows, device)
        metrics = {"epoch": epoch, "loss": loss, "train_images": int(len(rows)),
                   **_validation_metrics(data.labels[val_rows], scores)}
        history.append(metrics)
        _report(model, optimizer, history, cfg, rank)


def _validation_metrics(labels: np.ndarray, scores: np.ndarray) -> dict:
    if len(set(labels.tolist())) < 2:
        return {}
    threshold, _ = eer_threshold(labels, scores)
    values = binary_metrics(labels, scores, threshold)
    return {f"val_{k}": v for k, v in values.items() if k in ("auroc", "balanced_accuracy", "n")}


def _resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming after epoch %d", state["history"][-1]["epoch"])
    return state["history"][-1]["epoch"] + 1, state["history"]


def _report(model, optimizer, history: list[dict], cfg: CNNConfig, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            inner = model.module if hasattr(model, "module") else model
            torch.save({"model": inner.state_dict(), "optimizer": optimizer.state_dict(),
                        "history": history}, Path(folder) / STATE_FILE)
            record = {"config": asdict(cfg), "history": history, "code_version": code_version(),
                      "saved_at": utc_now()}
            (Path(folder) / "cnn.json").write_text(json.dumps(record, indent=2))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(history[-1], checkpoint=checkpoint)


def run_cnn_training(cfg: CNNConfig) -> list[dict]:
    """Train (or resume) and return the loss/metric history of every epoch so far."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    table = image_table(cfg)
    ensure_ray()
    where = placement.place(cfg.device, max_workers=cfg.workers)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"cfg": asdict(cfg), "table": table.to_dict("list"),
                                       "use_gpu": where.use_gpu},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=where.use_gpu,
                                               resources_per_worker=where.worker_resources()),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=str(Path(cfg.output).resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        history = json.loads((Path(folder) / "cnn.json").read_text())["history"]
    for row in history:
        log.info("epoch %d: loss %.4f, validation AUROC %s", row["epoch"], row["loss"],
                 row.get("val_auroc"))
    return history
