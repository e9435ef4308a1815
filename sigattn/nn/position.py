"""Position encodings: rotary (RoPE), ALiBi slopes and sinusoidal absolute positions.

RoPE rotates each query and key inside the attention; ALiBi adds ``-slope_h * |i - j|`` to the logits
(``sigmoid_attn_func``'s ``alibi_slopes``, an additive mask for softmax); sinusoidal positions are added
to the token embeddings by the model. All of them are defined for any length, so a model trained at one
context length can be evaluated at others.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def rope_angles(seqlen: int, head_dim: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles ``pos * base^(-2i / head_dim)``, each (seqlen, head_dim / 2),
    float32 (computed in float64: float32 angles lose precision at large positions)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)  # [D/2]
    angles = torch.arange(seqlen, device=device, dtype=torch.float64)[:, None] * inv_freq  # [S, D/2]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates the pairs (x[..., i], x[..., i + D/2]) of x (B, S, H, D) by the angles of each position
    (GPT-NeoX's half split). cos and sin are (S, D/2); computes in float32 (float64 for float64 x) and
    returns x's dtype."""
    half = x.shape[-1] // 2
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xc[..., :half], xc[..., half:]  # [B, S, H, D/2]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [S, 1, D/2]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE for heads of ``head_dim``; keeps a table of angles and extends it for longer inputs. The table
    stays float32 whatever dtype the module is cast to."""

    def __init__(self, head_dim: int, base: float = 10000.0, seqlen: int = 256):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        cos, sin = rope_angles(seqlen, head_dim, base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q (B, S, Hq, D) and k (B, S, Hkv, D), rotated by their positions 0 .. S-1."""
        seqlen = q.shape[1]
        if seqlen > self.cos.shape[0]:
            cos, sin = rope_angles(seqlen, self.head_dim, self.base, device=q.device)
        else:
            cos, sin = self.cos[:seqlen], self.sin[:seqlen]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def _apply(self, fn, recurse=True):
        # ``module.to(torch.bfloat16)`` (or .half(), .double()) casts buffers: a bf16 table would rotate by
        # rounded angles, unlike the float32 ones computed past its end. The cast is undone here, where every
        # cast and move of the module passes, so forward stays as is; the table is recomputed, not cast back,
        # as the cast has already rounded it. Device moves apply as usual.
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            self.cos, self.sin = rope_angles(self.cos.shape[0], self.head_dim, self.base, device=self.cos.device)
        return self


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's head slopes (Press et al.), float32 (num_heads,): the geometric sequence
    ``2^(-8 h / n)``, h = 1..n, for a power of two n; otherwise the slopes of the next lower power of two
    followed by every other slope of the next higher one."""

    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    lower = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(lower) + powers(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, seqlen_q: int, seqlen_k: int) -> Tensor:
    """``-slope_h * |i - j|`` as (H, Sq, Sk) float32, the query and key positions aligned at the end
    (query i at key position i + Sk - Sq), as ``sigmoid_attn_func`` aligns them."""
    device = slopes.device
    rows = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    dist = (rows - torch.arange(seqlen_k, device=device)[None, :]).abs()  # [Sq, Sk]
    return -slopes.float()[:, None, None] * dist


def sinusoidal_positions(seqlen: int, dim: int, base: float = 10000.0, device=None) -> Tensor:
    """The Transformer's absolute position table (seqlen, dim), float32: sin in the even channels and
    cos in the odd ones, with wavelengths from 2 pi to ``base * 2 pi``."""
    positions = torch.arange(seqlen, device=device, dtype=torch.float32)[:, None]  # [S, 1]
    inv_freq = base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)  # [ceil(dim/2)]
    table = torch.zeros(seqlen, dim, device=device)
    table[:, 0::2] = torch.sin(positions * inv_freq)
    table[:, 1::2] = torch.cos(positions * inv_freq[: dim // 2])
    return table
