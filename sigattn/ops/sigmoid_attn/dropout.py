"""Attention dropout: which (batch row, head, query, key) weights a call drops, the same on every backend.

A weight P[b, h, i, j] is kept when its 16-bit draw is at least ``threshold(p)`` = round(p * 2^16); kept
weights are scaled by 1 / (1 - p), as torch.nn.functional.dropout does. The draws come from Philox4x32-10
keyed by the call's 64-bit seed: the call at counter (j // 8, i, b * H + h, 0) gives four 32-bit words, whose
eight 16-bit halves (low half first, word by word) are the draws of keys 8 (j // 8) .. 8 (j // 8) + 7. Eight
weights per call: the generator's integer work is the kernels' cost under dropout (with one 31-bit word per
weight, the Triton forward at D128 ran at 0.17x its speed without dropout: 120 of 719 TFLOP/s, H100), and
16 bits resolve p to within 2^-17 (FlashAttention 2 compares 8). For packed sequences b is the sequence and
i, j count from its first token. The Triton kernels draw the same words with ``tl.philox``
(``triton_kernels._kept``), the PyTorch backends with ``philox`` here, so a mask depends on the seed and the
indices only, never on tiles, blocks or the backend: ``keep_mask`` is the mask a kernel applied (the debug entry
point the tests compare against), and a backward regenerates the forward's mask from the seed alone.

The seed is an int64 tensor on the call's device, drawn by ``draw_seed`` from PyTorch's generator of that
device: ``torch.manual_seed`` makes a run reproducible, and under CUDA graphs each replay draws a new one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Philox4x32-10's multipliers and key increments (Salmon et al. 2011; the constants of Triton's tl.philox).
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_LOW32 = 0xFFFFFFFF
DRAW_BITS = 16  # each weight's draw: a 16-bit half of a Philox word
DRAWS_PER_CALL = 4 * 32 // DRAW_BITS  # the keys one Philox call serves
_DRAWS = 1 << DRAW_BITS


class Dropout(NamedTuple):
    """A call's attention dropout: the probability ``p`` in (0, 1) and the int64 ``seed`` tensor (one
    element, on the call's device) that fixes which weights are dropped. ``first_batch``: the index of the
    first batch row it is applied to (the packed sequence a per-sequence computation handles)."""

    p: float
    seed: Tensor
    first_batch: int = 0

    @property
    def threshold(self) -> int:
        return threshold(self.p)

    @property
    def keep_scale(self) -> float:
        """1 / (1 - p): the factor of a kept weight."""
        return 1.0 / (1.0 - self.p)


def threshold(p: float) -> int:
    """The 16-bit draw below which a weight is dropped: round(p * 2^16); a weight is kept with probability
    1 - threshold / 2^16 (p to within 2^-17; ``validation.check_dropout_p`` refuses a p that rounds to 0)."""
    return round(p * _DRAWS)


def draw_seed(device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
    """A fresh seed, an int64 tensor of one element on ``device``: from PyTorch's default generator of
    ``device``, or from ``generator`` (drawn on its device, then moved)."""
    if generator is None:
        return torch.randint(0, 1 << 62, (1,), dtype=torch.int64, device=device)
    return torch.randint(0, 1 << 62, (1,), dtype=torch.int64, generator=generator, device=generator.device).to(device)


def _mul_hi_lo(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of a * b for 32-bit a (int64 tensor) and b, without int64 overflow: b is
    split into 16-bit halves, so every partial product stays below 2^49."""
    high_part = a * (b >> 16)  # < 2^48
    low_part = a * (b & 0xFFFF)  # < 2^48
    high = (high_part + (low_part >> 16)) >> 16
    low = (((high_part & 0xFFFF) << 16) + low_part) & _LOW32
    return high, low


def philox(seed: int | Tensor, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor) -> tuple[Tensor, ...]:
    """The four 32-bit words of Philox4x32-10 with key (seed's low, high 32 bits) at counters (c0, c1, c2,
    c3), elementwise over the broadcast counters (int64 tensors of values in [0, 2^32)), as int64. A tensor
    seed is never read on the host (``torch.compile`` traces this)."""
    k0, k1 = seed & _LOW32, (seed >> 32) & _LOW32
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _LOW32, (k1 + _KEY_B) & _LOW32
    return c0, c1, c2, c3


def draws(seed: int | Tensor, bh: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """The 16-bit draw of the weight of (batch row x heads + head ``bh``, query ``i``, key ``j``), elementwise
    over the broadcast indices (int64 tensors), as int64: the rule of the module docstring."""
    words = philox(seed, j // DRAWS_PER_CALL, i, bh, j.new_zeros(()))
    slot = j % DRAWS_PER_CALL  # which half of which word
    word = torch.stack(words).gather(0, (slot // 2).expand_as(words[0]).unsqueeze(0)).squeeze(0)
    return (word >> (DRAW_BITS * (slot % 2))) & (_DRAWS - 1)


def kept(dropout: Dropout, bh: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """True where the weight of (batch row x heads + head ``bh``, query ``i``, key ``j``) is kept, elementwise
    over the broadcast indices (int64 tensors): its draw is at least the threshold."""
    return draws(dropout.seed, bh, i, j) >= dropout.threshold


def keep_mask(
    dropout: Dropout,
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    *,
    rows: Tensor | None = None,
    cols: Tensor | None = None,
) -> Tensor:
    """The kept weights of a (batch, heads, seqlen_q, seqlen_k) attention, True where kept, on the seed's
    device, for batch rows ``dropout.first_batch`` on; ``rows``, ``cols``: only these queries and keys (a
    tile), as (batch, heads, len(rows), len(cols))."""
    device = dropout.seed.device
    first = dropout.first_batch
    bh = torch.arange(first, first + batch, device=device)[:, None] * heads + torch.arange(heads, device=device)
    i = torch.arange(seqlen_q, device=device) if rows is None else rows.to(device)
    j = torch.arange(seqlen_k, device=device) if cols is None else cols.to(device)
    return kept(dropout, bh[:, :, None, None], i[None, None, :, None], j[None, None, None, :])


def factors(dropout: Dropout, keep: Tensor, dtype: torch.dtype) -> Tensor:
    """1 / (1 - p) where ``keep`` (from ``keep_mask``), else 0: the factor of each weight, in ``dtype``."""
    return keep.to(dtype) * dropout.keep_scale
