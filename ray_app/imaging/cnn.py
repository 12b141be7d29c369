"""2D CNN fine-tuning on whole images (DICOM or PNG/JPEG) with report labels, as in the ankle
radiograph study: torchvision ResNet18 or DenseNet121 with one output logit, random rotation and
random resized crops, and negatives undersampled afresh each epoch. Pure torch; the Ray Train
layer is in cnn_train_job.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

log = logging.getLogger(__name__)

ARCHITECTURES = ("resnet18", "densenet121")


@dataclass
class CNNConfig:
    """One CNN training run; every field is a flag of jobs/train_cnn.py."""

    images: str = field(metadata={"doc": "CSV/Parquet with columns image (DICOM or PNG/JPEG path) and label (0/1); optional study_uid groups the split."})
    output: str = field(metadata={"doc": "Folder for checkpoints (rerun the same command to resume)."})
    architecture: str = field(default="densenet121", metadata={"doc": "resnet18 or densenet121."})
    weights: str | None = field(default=None, metadata={"doc": "ImageNet state dict of the architecture."})
    allow_random_weights: bool = field(default=False, metadata={"doc": "Train from random weights when no file is given."})
    image_size: int = field(default=640, metadata={"doc": "Side of the square network input (the ankle study: 640)."})
    epochs: int = field(default=5, metadata={"doc": "Epochs in total (a resumed run does the rest)."})
    batch_size: int = field(default=16, metadata={"doc": "Images per step per worker."})
    learning_rate: float = field(default=1e-4, metadata={"doc": "AdamW learning rate."})
    negatives_per_positive: float = field(default=1.0, metadata={"doc": "Negatives drawn per positive each epoch (undersampling); 0 keeps all."})
    rotation_degrees: float = field(default=15.0, metadata={"doc": "Random rotation range (+-)."})
    crop_scale: float = field(default=0.8, metadata={"doc": "Smallest area fraction of a random crop."})
    validation: float = field(default=0.2, metadata={"doc": "Fraction of images (or studies) held out."})
    workers: int = field(default=1, metadata={"doc": "Ray Train workers (one GPU each on GPUs)."})
    device: str = field(default="auto", metadata={"doc": "'cuda': a GPU per worker whatever the cluster holds now; 'cpu'; 'auto': GPUs if the cluster has or can reach some."})
    seed: int = field(default=0, metadata={"doc": "Seed of split, sampling, augmentation and init."})


def read_image(path: str) -> np.ndarray:
    """A 2D float32 image: DICOM (rescaled; the middle frame of a multi-frame image) or PNG/JPEG
    (as grey levels), recognised by content rather than by name."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float32)
        if pixels.ndim == 3:
            pixels = pixels[len(pixels) // 2]
        return pixels * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    return np.asarray(Image.open(path).convert("F"), dtype=np.float32)


def to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """(1, size, size) in [0, 1] between the image's 1st and 99th percentiles."""
    low, high = np.percentile(image, [1, 99])
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    tensor = torch.from_numpy(scaled.astype(np.float32))[None, None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[0]


def augmentation(cfg: CNNConfig) -> v2.Compose:
    return v2.Compose([
        v2.RandomRotation(cfg.rotation_degrees),
        v2.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_scale, 1.0), antialias=True),
    ])


def undersample(labels: np.ndarray, negatives_per_positive: float,
                rng: np.random.Generator) -> np.ndarray:
    """Every positive and a fresh random draw of negatives, shuffled; all rows if the ratio is 0
    or there are too few negatives."""
    positives = np.flatnonzero(labels == 1)
    negatives = np.flatnonzero(labels == 0)
    keep = int(round(len(positives) * negatives_per_positive))
    if negatives_per_positive > 0 and keep < len(negatives):
        negatives = rng.choice(negatives, size=keep, replace=False)
    return rng.permutation(np.concatenate([positives, negatives]))


def build_cnn(cfg: CNNConfig) -> torch.nn.Module:
    """The architecture with one output logit; ImageNet weights from cfg.weights (the classifier
    head is replaced), or random weights only when allowed."""
    import torchvision.models as models

    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {cfg.architecture!r} is not one of {ARCHITECTURES}")
    torch.manual_seed(cfg.seed)
    model = getattr(models, cfg.architecture)(weights=None)
    if cfg.weights:
        model.load_state_dict(torch.load(cfg.weights, map_location="cpu", weights_only=True))
    elif not cfg.allow_random_weights:
        raise ValueError(f"no ImageNet weights for {cfg.architecture}: pass --weights (torchvision's "
                         "state-dict file), or --allow-random-weights to train from scratch")
    if cfg.architecture == "resnet18":
        model.fc = torch.nn.Linear(model.fc.in_features, 1)
    else:
        model.classifier = torch.nn.Linear(model.classifier.in_features, 1)
    return model


class ImageBatches:
    """Loads, augments and batches images by row index (each file read when needed)."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, cfg: CNNConfig):
        self.paths, self.labels, self.cfg = list(paths), labels, cfg
        self.augment = augmentation(cfg)
        # Read a little larger than the input so that crops and rotations have room.
        self.load_size = int(round(cfg.image_size * 1.15))

    def batch(self, indices: Sequence[int], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images = []
        for i in indices:
            image = to_tensor(read_image(self.paths[i]), self.load_size)
            image = self.augment(image) if train else v2.functional.center_crop(image, self.cfg.image_size)
            images.append(image.expand(3, -1, -1))
        return torch.stack(images), torch.as_tensor(self.labels[list(indices)], dtype=torch.float32)


def train_epoch(model: torch.nn.Module, data: ImageBatches, indices: np.ndarray,
                optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """One pass over `indices`; the mean binary cross-entropy."""
    model.train()
    losses = []
    for start in range(0, len(indices), data.cfg.batch_size):
        images, labels = data.batch(indices[start:start + data.cfg.batch_size], train=True)
        logits = model(images.to(device)).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


@torch.inference_mode()
def predict_scores(model: torch.nn.Module, data: ImageBatches, indices: np.ndarray,
                   device: torch.device) -> np.ndarray:
    """Sigmoid scores of un-augmented (centre-cropped) images."""
    model.eval()
    scores = []
    for start in range(0, len(indices), data.cfg.batch_size):
        images, _ = data.batch(indices[start:start + data.cfg.batch_size], train=False)
        scores.append(torch.sigmoid(model(images.to(device)).squeeze(1)).cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0)


def image_path(base: Path, value: str) -> str:
    """Paths in an image list are relative to the list's folder unless absolute."""
    path = Path(value)
    return str(path if path.is_absolute() else base / path)
