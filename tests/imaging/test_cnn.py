"""CNN fine-tuning: image reading, undersampling, augmentation, falling loss on a tiny case, and
the Ray Train run with checkpoints and resumption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ray_app.imaging.cnn import (
    CNNConfig,
    ImageBatches,
    build_cnn,
    read_image,
    to_tensor,
    train_epoch,
    undersample,
)


def test_undersampling_keeps_every_positive_and_draws_fresh_negatives():
    labels = np.array([1] * 5 + [0] * 45)
    first = undersample(labels, 2.0, np.random.default_rng(0))
    second = undersample(labels, 2.0, np.random.default_rng(1))
    assert len(first) == 15 and set(range(5)) <= set(first.tolist())
    assert set(first.tolist()) != set(second.tolist())
    assert len(undersample(labels, 0, np.random.default_rng(0))) == 50
    assert len(undersample(labels, 20.0, np.random.default_rng(0))) == 50  # too few negatives


def test_dicom_and_png_are_read_by_content(phantoms, tmp_path):
    row = pd.read_csv(phantoms["images"]).iloc[0]
    assert not Path(row["image"]).is_absolute()  # relative to the list, wherever it was written
    dicom = read_image(str(phantoms["images"].parent / row["image"]))
    assert dicom.shape == (96, 96) and dicom.dtype == np.float32 and dicom.max() > 500  # rescaled
    png = tmp_path / "x.dcm"  # a misleading name: the content decides
    Image.fromarray(np.arange(64 * 32, dtype=np.uint8).reshape(64, 32) % 251).save(png, format="PNG")
    image = read_image(str(png))
    assert image.shape == (64, 32) and image[0, 5] == 5.0
    tensor = to_tensor(image, 48)
    assert tensor.shape == (1, 48, 48) and 0 <= float(tensor.min()) and float(tensor.max()) <= 1


def test_random_weights_need_asking_and_heads_have_one_logit():
    with pytest.raises(ValueError, match="--allow-random-weights"):
        build_cnn(CNNConfig(images="x", output="y", architecture="resnet18"))
    with pytest.raises(ValueError, match="not one of"):
        build_cnn(CNNConfig(images="x", output="y", architecture="vgg", allow_random_weights=True))
    model = build_cnn(CNNConfig(images="x", output="y", architecture="densenet121",
                                allow_random_weights=True))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 1)


def tiny_config(images, output, **kwargs) -> CNNConfig:
    base = dict(images=str(images), output=str(output), architecture="resnet18",
                allow_random_weights=True, image_size=48, batch_size=8, learning_rate=1e-3,
                rotation_degrees=10, negatives_per_positive=1.0)
    return CNNConfig(**{**base, **kwargs})


def bright_square_images(folder, n: int = 24) -> pd.DataFrame:
    """PNG images; positives hold a bright square somewhere (an easy signal to learn)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = rng.normal(80, 20, (40, 40))
        if i % 2:
            r, c = rng.integers(4, 24, 2)
            image[r:r + 12, c:c + 12] += 120
        path = folder / f"img{i}.png"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
        rows.append({"image": path.name, "label": i % 2})
    table = pd.DataFrame(rows)
    table.to_csv(folder / "images.csv", index=False)
    return table


def test_loss_falls_over_a_few_epochs_on_a_tiny_case(tmp_path):
    table = bright_square_images(tmp_path)
    cfg = tiny_config(tmp_path / "images.csv", "unused", image_size=32, batch_size=12,
                      learning_rate=3e-4, negatives_per_positive=0)
    data = ImageBatches([str(tmp_path / p) for p in table["image"]], table["label"].to_numpy(), cfg)
    model = build_cnn(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    torch.manual_seed(0)
    losses = [train_epoch(model, data, np.random.default_rng(e).permutation(len(table)),
                          optimizer, torch.device("cpu")) for e in range(5)]
    assert np.mean(losses[-2:]) < 0.6 * losses[0], losses
    images, labels = data.batch([0, 1, 2], train=True)
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_ray_train_checkpoints_every_epoch_and_resumes(phantoms, tmp_path):
    import ray

    from ray_app.imaging.cnn_train_job import run_cnn_training

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    try:
        first = run_cnn_training(tiny_config(phantoms["images"], tmp_path / "run", epochs=2,
                                             image_size=32, batch_size=16))
        assert [h["epoch"] for h in first] == [0, 1]
        assert all(np.isfinite(h["loss"]) for h in first) and "val_auroc" in first[-1]
        resumed = run_cnn_training(tiny_config(phantoms["images"], tmp_path / "run", epochs=3,
                                               image_size=32, batch_size=16))
        assert [h["epoch"] for h in resumed] == [0, 1, 2]
        assert resumed[:2] == first  # epochs 0-1 came from the checkpoint, not a retraining
    finally:
        ray.shutdown()


def test_image_list_given_relative_to_the_working_directory(phantoms, monkeypatch):
    """`--images phantoms/images.csv` from the folder above: every image resolves to an existing
    absolute path, since Ray Train workers run in another working directory."""
    from ray_app.imaging.cnn_train_job import image_table

    monkeypatch.chdir(phantoms["images"].parent.parent)
    relative = Path(phantoms["images"].parent.name) / phantoms["images"].name
    table = image_table(CNNConfig(images=str(relative), output="unused"))
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in table["image"])
