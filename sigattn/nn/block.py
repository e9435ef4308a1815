"""The transformer block: attention and MLP sublayers with pre-, post- or hybrid-norm and LayerScale.

    pre:     x = x + ls1(attn(norm1(x)));          x = x + ls2(mlp(norm2(x)))
    post:    x = norm1(x + ls1(attn(x)));          x = norm2(x + ls2(mlp(x)))
    hybrid:  x = x + ls1(norm3(attn(norm1(x))));   x = x + ls2(mlp(norm2(x)))

Hybrid-norm also normalises the attention output before the residual add, which bounds what a layer
of sigmoid attention (whose weights need not sum to 1) can add to the residual stream. ``ls`` is
LayerScale (a learnable per-channel gain, initialised small) or the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import SigmoidAttention
from .config import BlockConfig
from .norms import make_norm


class MLP(nn.Module):
    """GELU MLP (d -> ratio*d -> d) or SwiGLU (d -> 2 * h -> d, h = 2/3 ratio*d rounded up to 8, about
    the same parameter count)."""

    def __init__(self, d_model: int, ratio: float, kind: str, dropout: float = 0.0):
        super().__init__()
        self.kind = kind
        hidden = int(ratio * d_model)
        if kind == "swiglu":
            hidden = -(-int(2 * hidden / 3) // 8) * 8
            self.fc = nn.Linear(d_model, 2 * hidden, bias=False)
        elif kind == "gelu":
            self.fc = nn.Linear(d_model, hidden, bias=False)
        else:
            raise ValueError(f"mlp must be 'gelu' or 'swiglu'; got {kind!r}")
        self.proj = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, S, C) -> (B, S, C)."""
        h = self.fc(x)  # [B, S, hidden] or [B, S, 2 * hidden]
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value  # [B, S, hidden]
        else:
            h = F.gelu(h)
        return self.dropout(self.proj(h))


class LayerScale(nn.Module):
    """x * gamma with a learnable per-channel gamma initialised to ``init`` (Touvron et al., CaiT)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class TransformerBlock(nn.Module):
    """Attention then MLP, each with a residual connection, normalised as ``config.norm_style`` says.

    Args:
        config: the block settings.
        seqlen: the training sequence length (the sigmoid bias is ``-log(seqlen)`` by default).
        causal: causal (decoder) or full (encoder) attention.
    """

    def __init__(self, config: BlockConfig, seqlen: int, causal: bool):
        super().__init__()
        self.style = config.norm_style
        self.norm1 = make_norm(config.norm, config.d_model)
        self.attn = SigmoidAttention(config, seqlen, causal)
        self.norm2 = make_norm(config.norm, config.d_model)
        self.mlp = MLP(config.d_model, config.mlp_ratio, config.mlp, config.dropout)
        self.attn_out_norm = make_norm(config.norm, config.d_model) if self.style == "hybrid" else None
        scale = config.layerscale
        self.ls1 = LayerScale(config.d_model, scale) if scale is not None else nn.Identity()
        self.ls2 = LayerScale(config.d_model, scale) if scale is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x (B, S, C) -> (B, S, C)."""
        if self.style == "post":
            x = self.norm1(x + self.ls1(self.attn(x)))
            return self.norm2(x + self.ls2(self.mlp(x)))
        attn = self.attn(self.norm1(x))
        if self.attn_out_norm is not None:
            attn = self.attn_out_norm(attn)
        x = x + self.ls1(attn)
        return x + self.ls2(self.mlp(self.norm2(x)))
