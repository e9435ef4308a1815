"""LayerNorm and RMSNorm by name."""

from __future__ import annotations

from torch import nn

NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """A LayerNorm or RMSNorm over the last dimension (of size ``dim``), with a learnable gain."""
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}; got {kind!r}")
    return NORMS[kind](dim, eps=eps)
