"""Image classification data: scikit-learn's bundled ``digits`` (8 x 8 handwritten digits, 1797 images,
no download) or any ``.npz`` file with ``images`` (N, C, H, W) or (N, H, W) and integer ``labels`` (N,)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass
class ImageSplit:
    """Train and validation images (N, C, H, W) float32 in [0, 1] and labels (N,) int64."""

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor

    @property
    def num_classes(self) -> int:
        return int(max(self.train_labels.max(), self.val_labels.max())) + 1


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 1, 8, 8) scaled from 0..16 to [0, 1], labels (1797,)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ImportError("the digits data set needs scikit-learn: pip install 'sigattn[train]'") from None
    digits = sklearn_digits()
    return digits.images[:, None].astype(np.float32) / 16.0, digits.target.astype(np.int64)


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """images and labels from an .npz file; images (N, H, W) get a channel axis."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    with np.load(path) as data:
        missing = {"images", "labels"} - set(data.files)
        if missing:
            raise ValueError(f"{path} must hold arrays 'images' and 'labels'; missing {sorted(missing)}")
        images, labels = data["images"].astype(np.float32), data["labels"].astype(np.int64)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[2] != images.shape[3] or labels.shape != (images.shape[0],):
        raise ValueError(
            f"{path}: images must be (N, C, S, S) or (N, S, S) and labels (N,), got {images.shape} and {labels.shape}"
        )
    if labels.size and labels.min() < 0:
        raise ValueError(f"{path}: labels must be non-negative class indices")
    return images, labels


def split_images(images: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int) -> ImageSplit:
    """A shuffled (by ``seed``) split holding ``val_fraction`` of the images for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(images))
    num_val = max(1, round(val_fraction * len(images)))
    if num_val >= len(images):
        raise ValueError(f"{len(images)} images are too few to hold out {val_fraction:.0%} for validation")
    val, train = order[:num_val], order[num_val:]
    t = torch.from_numpy
    return ImageSplit(t(images[train]), t(labels[train]), t(images[val]), t(labels[val]))
