"""ResNet18 slice embeddings of disc volumes: each slice scaled to [0, 1], resized to
image_size x image_size, repeated to three channels and ImageNet-normalised, through ResNet18
without its fc layer; the mean over slices is the disc's 512-number embedding."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EMBEDDING_SIZE = 512


class WeightsError(RuntimeError):
    """No ImageNet weights where the caller needs them."""


@dataclass(frozen=True)
class EmbeddingSettings:
    """How disc volumes are cut and embedded; recorded with every embedding and classifier, and
    a classifier is only applied to embeddings made the same way."""

    weights_id: str = field(metadata={"doc": "What the encoder's weights were (file hash or random seed)."})
    crop_shape: tuple[int, int, int] = field(default=(9, 112, 224), metadata={"doc": "Slices, height, width of a disc volume."})
    target_spacing_mm: float | None = field(default=None, metadata={"doc": "In-plane resampling; None keeps the series' spacing."})
    image_size: int = field(default=224, metadata={"doc": "Side each slice is resized to."})

    def to_dict(self) -> dict:
        data = asdict(self)
        data["crop_shape"] = list(self.crop_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "EmbeddingSettings":
        return cls(**{**data, "crop_shape": tuple(data["crop_shape"])})


def default_weights_file() -> Path:
    """Where torchvision caches the ImageNet ResNet18 weights it downloads."""
    from torchvision.models import ResNet18_Weights

    name = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def load_encoder(weights: str | None = None, allow_random: bool = False,
                 seed: int = 0) -> tuple[torch.nn.Module, str]:
    """ResNet18 without fc (outputs 512 numbers) in eval mode, and an id of its weights.

    `weights`: a state-dict file; None looks in torchvision's cache. With no file, random
    weights (seeded, so reproducible) only when `allow_random`: they carry no ImageNet
    features, which is fine for testing the plumbing and nothing else."""
    from torchvision.models import resnet18

    path = Path(weights) if weights else default_weights_file()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = resnet18(weights=None)
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # noqa: BLE001 - torch raises unpickling, size and key errors
            raise WeightsError(f"{path} is not a ResNet18 state dict: {str(err)[:300]}") from err
        weights_id = f"{path.name}#sha256:{_sha256(path)[:16]}"
    elif weights:
        raise WeightsError(f"weights file {weights} does not exist")
    elif allow_random:
        log.warning("no ImageNet weights at %s: using RANDOM ResNet18 weights (seed %d)", path, seed)
        weights_id = f"random-resnet18(seed={seed})"  # parsed by random_weights_seed
    else:
        raise WeightsError(
            f"no ImageNet weights for ResNet18 (looked in {path}). Copy torchvision's "
            f"'{path.name}' there or pass its path (--weights); to test the plumbing with "
            "random weights, pass --allow-random-weights (the embeddings are then not ImageNet "
            "features)")
    model.fc = torch.nn.Identity()
    return model.eval(), weights_id


def random_weights_seed(weights_id: str) -> int | None:
    """The seed of a random-weights id made by load_encoder, else None."""
    prefix = "random-resnet18(seed="
    return int(weights_id[len(prefix):-1]) if weights_id.startswith(prefix) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def slices_to_images(volumes: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, S, H, W) float -> (B*S, 3, size, size) ImageNet-normalised. Each volume is scaled to
    [0, 1] between its 1st and 99th percentiles (MR intensities have no absolute unit)."""
    b, s, h, w = volumes.shape
    flat = volumes.reshape(b, -1).float()
    low = torch.quantile(flat, 0.01, dim=1).view(b, 1, 1, 1)
    high = torch.quantile(flat, 0.99, dim=1).view(b, 1, 1, 1)
    scaled = ((volumes - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
    images = F.interpolate(scaled.reshape(b * s, 1, h, w), size=(image_size, image_size),
                           mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=volumes.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=volumes.device).view(1, 3, 1, 1)
    return (images.expand(-1, 3, -1, -1) - mean) / std


class DiscEmbedder:
    """Embeds batches of disc volumes with one encoder (loaded once, e.g. per Ray actor)."""

    def __init__(self, weights: str | None = None, allow_random: bool = False,
                 image_size: int = 224, device: str | None = None, batch_volumes: int = 16,
                 seed: int = 0):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        encoder, self.weights_id = load_encoder(weights, allow_random, seed)
        self.encoder = encoder.to(self.device)
        self.image_size = image_size
        self.batch_volumes = max(1, batch_volumes)

    @torch.inference_mode()
    def embed(self, volumes: np.ndarray) -> np.ndarray:
        """(N, S, H, W) -> (N, 512) float32: the mean of the slices' embeddings."""
        if volumes.ndim != 4:
            raise ValueError(f"expected (volumes, slices, height, width), got shape {volumes.shape}")
        out = []
        for start in range(0, len(volumes), self.batch_volumes):
            chunk = torch.tensor(volumes[start:start + self.batch_volumes], device=self.device)
            features = self.encoder(slices_to_images(chunk, self.image_size))
            out.append(features.view(len(chunk), -1, EMBEDDING_SIZE).mean(dim=1).float().cpu())
        if not out:
            return np.zeros((0, EMBEDDING_SIZE), np.float32)
        return torch.cat(out).numpy()
