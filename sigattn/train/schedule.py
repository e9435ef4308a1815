"""The learning-rate schedule: linear warmup, then cosine decay to ``min_lr`` at ``train.schedule_steps``
(``train.decay_steps``, or ``max_steps`` when that is not set), then ``min_lr`` for any steps after it (a run
extended past the length it started with)."""

from __future__ import annotations

import math

from .config import OptimConfig


def learning_rate(step: int, optim: OptimConfig, decay_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): ``lr * (step + 1) / warmup_steps`` during
    warmup, then ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` with t going from 0 at the end of
    warmup to 1 at ``decay_steps``, and ``min_lr`` after it."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    t = min(1.0, (step - optim.warmup_steps) / max(1, decay_steps - optim.warmup_steps))
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * t))
