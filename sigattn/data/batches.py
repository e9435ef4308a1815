"""Batches whose contents depend only on (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would, and on nothing else: no data-loader state to save beyond the step."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step) alone. The two are mixed by numpy's SeedSequence: the CPU
    generator keeps only 32 bits of its seed, so packing them side by side would drop the seed."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


class TokenBatches:
    """Random windows of a token stream for next-token prediction.

    ``batch(step)`` is ``batch_size`` windows of ``seqlen + 1`` tokens at random offsets drawn from
    (seed, step): inputs (B, S) and targets shifted by one (B, S), int64 on the CPU (whatever integer type
    ``tokens`` has: a large corpus is kept in a narrower one).
    """

    def __init__(self, tokens: Tensor, batch_size: int, seqlen: int, seed: int):
        if tokens.numel() < seqlen + 2:
            raise ValueError(f"the training text has {tokens.numel()} tokens: too few for windows of {seqlen + 1}")
        self.tokens, self.batch_size, self.seqlen, self.seed = tokens, batch_size, seqlen, seed

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        starts = torch.randint(
            self.tokens.numel() - self.seqlen, (self.batch_size,), generator=step_generator(self.seed, step)
        )
        offsets = starts[:, None] + torch.arange(self.seqlen + 1)  # [B, S + 1]
        windows = self.tokens[offsets].long()
        return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: Tensor, seqlen: int, num_windows: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Fixed evaluation batches: ``num_windows`` windows at evenly spaced offsets over the whole stream
    (the same for every run), as int64 (inputs, targets) pairs of at most ``batch_size`` rows."""
    if tokens.numel() < seqlen + 1:
        raise ValueError(
            f"the validation text has {tokens.numel()} tokens: too few to evaluate at context length {seqlen}"
        )
    starts = torch.linspace(0, tokens.numel() - seqlen - 1, num_windows).long()
    windows = tokens[starts[:, None] + torch.arange(seqlen + 1)].long()  # [N, S + 1]
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]


class ImageBatches:
    """Random minibatches of (images, labels); ``batch(step)`` draws its indices from (seed, step)."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, seed: int):
        self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        index = torch.randint(len(self.images), (self.batch_size,), generator=step_generator(self.seed, step))
        return self.images[index], self.labels[index]
