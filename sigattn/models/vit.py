"""A Vision Transformer classifier whose attention is sigmoid or softmax (``config.attn``).

images (B, C, H, W) -> patches (B, N, C p p) -> linear embedding (B, N, d) -> [CLS] + tokens
    (+ sinusoidal positions) -> n_layer TransformerBlocks (full attention) -> final norm
    -> the [CLS] token or the mean token -> logits (B, n_classes)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..nn import BlockConfig, TransformerBlock, make_norm, sinusoidal_positions
from ..nn.config import check_positive
from .gpt import INIT_STD, init_weights


@dataclass
class ViTConfig(BlockConfig):
    """A ViT: the block settings (``BlockConfig``) plus image, patch and class sizes."""

    image_size: int = 8
    patch_size: int = 2
    channels: int = 1
    n_classes: int = 10
    n_layer: int = 4
    pool: Literal["cls", "mean"] = "cls"

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "image_size", "patch_size", "channels", "n_classes", "n_layer")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size (got {self.patch_size})")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seqlen(self) -> int:
        """Tokens per image: the patches plus [CLS] when pooling with it."""
        return self.num_patches + (self.pool == "cls")


class ViT(nn.Module):
    """The classifier. ``activation_checkpointing = True`` recomputes each block in the backward."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        patch_dim = config.channels * config.patch_size**2
        self.patch_embed = nn.Linear(patch_dim, config.d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.d_model)) if config.pool == "cls" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(config, config.seqlen, causal=False) for _ in range(config.n_layer)
        )
        self.norm_f = make_norm(config.norm, config.d_model)
        self.head = nn.Linear(config.d_model, config.n_classes)
        init_weights(self, config.n_layer)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=INIT_STD)

    def patchify(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, C p p), patches in row-major order."""
        batch, channels, height, width = images.shape
        cfg = self.config
        if (channels, height, width) != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images must have shape (B, {cfg.channels}, {cfg.image_size}, {cfg.image_size}), "
                f"got {tuple(images.shape)}"
            )
        p = cfg.patch_size
        x = images.reshape(batch, channels, height // p, p, width // p, p)  # [B, C, H/p, p, W/p, p]
        return x.permute(0, 2, 4, 1, 3, 5).reshape(batch, cfg.num_patches, channels * p * p)  # [B, N, C p p]

    def forward(self, images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """images (B, C, H, W) -> logits (B, n_classes) and, given labels (B,), the mean cross-entropy."""
        x = self.patch_embed(self.patchify(images))  # [B, N, d]
        if self.cls is not None:
            x = torch.cat((self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)  # [B, N + 1, d]
        if self.config.pos == "sinusoidal":
            x = x + INIT_STD * sinusoidal_positions(x.shape[1], self.config.d_model, device=x.device).to(x.dtype)
        x = self.drop(x)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)  # [B, T, d]
        x = self.norm_f(x)
        pooled = x[:, 0] if self.cls is not None else x.mean(dim=1)  # [B, d]
        logits = self.head(pooled)  # [B, n_classes]
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return logits, loss
