"""ResNet18 disc embeddings: shape, determinism, batching, weights handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_app.imaging.embeddings import (
    DiscEmbedder,
    WeightsError,
    load_encoder,
    random_weights_seed,
    slices_to_images,
)


@pytest.fixture(scope="module")
def volumes() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(500, 100, (5, 3, 24, 48)) * np.linspace(0.5, 1.5, 48)).astype(np.float32)


@pytest.fixture(scope="module")
def embedder() -> DiscEmbedder:
    return DiscEmbedder(allow_random=True, image_size=64, device="cpu", batch_volumes=2)


def test_one_512_vector_per_volume_and_the_same_each_time(embedder, volumes):
    first = embedder.embed(volumes)
    assert first.shape == (5, 512) and first.dtype == np.float32
    assert np.isfinite(first).all() and first.std() > 0
    np.testing.assert_array_equal(first, embedder.embed(volumes))
    # A fresh encoder from the same seed gives the same vectors (what predict relies on).
    again = DiscEmbedder(allow_random=True, image_size=64, device="cpu", batch_volumes=5)
    np.testing.assert_allclose(again.embed(volumes), first, rtol=1e-4, atol=1e-5)
    other = DiscEmbedder(allow_random=True, image_size=64, device="cpu", seed=1)
    assert not np.allclose(other.embed(volumes), first, atol=1e-3)


def test_embedding_is_the_mean_of_the_slice_embeddings(embedder, volumes):
    whole = embedder.embed(volumes[:1])
    images = slices_to_images(torch.as_tensor(volumes[:1]), 64)
    with torch.inference_mode():
        per_slice = embedder.encoder(images).numpy()
    assert per_slice.shape == (3, 512)
    np.testing.assert_allclose(whole[0], per_slice.mean(axis=0), rtol=1e-4, atol=1e-5)


def test_slices_become_imagenet_normalised_three_channel_images(volumes):
    images = slices_to_images(torch.as_tensor(volumes), 224)
    assert images.shape == (15, 3, 224, 224)
    low = (0 - 0.485) / 0.229
    high = (1 - 0.485) / 0.229
    assert images[:, 0].min() >= low - 1e-5 and images[:, 0].max() <= high + 1e-5
    # The three channels carry the same grey image, normalised per channel.
    torch.testing.assert_close(images[:, 1] * 0.224 + 0.456, images[:, 0] * 0.229 + 0.485,
                               rtol=1e-5, atol=1e-5)


def test_random_weights_are_refused_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setattr("ray_app.imaging.embeddings.default_weights_file",
                        lambda: tmp_path / "absent.pth")
    with pytest.raises(WeightsError, match="--allow-random-weights"):
        load_encoder()
    with pytest.raises(WeightsError, match="does not exist"):
        load_encoder(str(tmp_path / "missing.pth"), allow_random=True)
    (tmp_path / "wrong.pth").write_bytes(b"not a state dict")
    with pytest.raises(WeightsError, match="not a ResNet18 state dict"):
        load_encoder(str(tmp_path / "wrong.pth"))
    _, weights_id = load_encoder(allow_random=True, seed=4)
    assert random_weights_seed(weights_id) == 4


def test_a_local_weights_file_is_loaded_and_identified_by_hash(tmp_path, volumes):
    from torchvision.models import resnet18

    torch.manual_seed(123)
    path = tmp_path / "resnet18-local.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    model, weights_id = load_encoder(str(path))
    assert weights_id.startswith("resnet18-local.pth#sha256:") and random_weights_seed(weights_id) is None
    assert isinstance(model.fc, torch.nn.Identity)
    from_file = DiscEmbedder(str(path), image_size=64, device="cpu").embed(volumes[:2])
    random = DiscEmbedder(allow_random=True, image_size=64, device="cpu").embed(volumes[:2])
    assert not np.allclose(from_file, random, atol=1e-3)
