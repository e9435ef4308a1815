"""The learning-rate schedule: linear warmup, then cosine decay to ``min_lr`` at the last step."""

from __future__ import annotations

import math

from .config import OptimConfig


def learning_rate(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): ``lr * (step + 1) / warmup_steps`` during
    warmup, then ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` with t going from 0 at the end of
    warmup to 1 at ``max_steps``."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    t = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * t))
