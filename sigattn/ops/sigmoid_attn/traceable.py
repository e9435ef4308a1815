"""The ``torch`` backend's formulation under ``torch.compile``: no control flow that depends on values.

The blocked path (``blocked.py``) skips masked tiles by reading the mask, and the varlen loop reads
``cu_seqlens`` on the host: under ``torch.compile`` the first is a guard on data (``fullgraph=True``
fails, and dynamic shapes failed in Inductor), the second a graph break. Here every call is one
materialised score matrix per head, computed by the reference's ``attend`` in float32 (float64 inputs in
float64), which Inductor traces with dynamic shapes: memory grows with B * H * Sq * Sk instead of the blocked
path's S * D, the price of a traceable graph. Packed sequences become one row of all their tokens whose
block-diagonal mask keeps each sequence to itself; the semantics are the reference's, value for value.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .dropout import Dropout, factors, kept
from .reference import Bias, Mask, attend, default_bias, in_window, masked_reference


def _compute_dtype(t: Tensor, exact: bool = False) -> torch.dtype:
    return torch.float64 if exact or t.dtype == torch.float64 else torch.float32


def sigmoid_attn_traceable(q: Tensor, k: Tensor, v: Tensor, **options) -> Tensor:
    """``masked_reference`` in float32 (float64 inputs in float64), returned in q's dtype."""
    dtype = _compute_dtype(q)
    return masked_reference(q.to(dtype), k.to(dtype), v.to(dtype), upcast=False, **options).to(q.dtype)


def sigmoid_attn_varlen_traceable(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    scale: float,
    bias: Bias,
    mask: Mask,
    alibi_slopes: Tensor | None = None,
    dropout: Dropout | None = None,
    exact: bool = False,
) -> Tensor:
    """``sigmoid_attn_varlen_reference`` without reading cu_seqlens on the host: q (total_q, Hq, D), k and v
    (total_k, Hkv, D) as one batch row, where query token t of sequence b = s(t) sits at position i(t) of it
    and may see key token u iff s(u) = b and i(t) + off_b - left <= i(u) <= i(t) + off_b + right. Computed
    in float64 with ``exact`` (the reference backend), else as ``sigmoid_attn_traceable``."""
    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    seq_q, pos_q = _sequence_positions(cu_q, q.shape[0])  # [Tq] each
    seq_k, pos_k = _sequence_positions(cu_k, k.shape[0])  # [Tk] each
    lengths_k = cu_k[1:] - cu_k[:-1]  # [B]
    offset = torch.zeros_like(pos_q) if mask.top_left else (lengths_k - (cu_q[1:] - cu_q[:-1]))[seq_q]
    diag = (pos_q + offset)[:, None]  # [Tq, 1]: the key position each query is aligned with
    same_sequence = seq_q[:, None] == seq_k[None, :]  # [Tq, Tk]
    allowed = in_window(same_sequence, pos_k[None, :], diag, mask)

    dtype = _compute_dtype(q, exact)
    num_heads = q.shape[1]
    if bias is None:
        terms = default_bias(lengths_k)[seq_q][:, None, None]  # [Tq, 1, 1]
    elif isinstance(bias, Tensor):
        terms = bias.reshape(1, num_heads, 1)
    else:
        terms = torch.full((1, 1, 1), float(bias), device=q.device, dtype=torch.float64)
    terms = terms.to(dtype).transpose(0, 1)  # [Hq or 1, Tq or 1, 1]
    if alibi_slopes is not None:
        slopes = alibi_slopes[seq_q] if alibi_slopes.dim() == 2 else alibi_slopes[None].expand(q.shape[0], -1)
        distance = (diag - pos_k[None, :]).abs()  # [Tq, Tk]
        terms = terms - slopes.t().to(dtype)[:, :, None] * distance.to(dtype)
    weights = None
    if dropout is not None:  # dropout.keep_mask's draw, with each token's sequence as its batch row
        heads = torch.arange(num_heads, device=q.device)[:, None, None]
        keep = kept(dropout, seq_q[None, :, None] * num_heads + heads, pos_q[None, :, None], pos_k[None, None, :])
        weights = factors(dropout, keep, dtype)[None]  # [1, Hq, Tq, Tk]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qkv = (q.to(dtype)[None], k.to(dtype)[None], v.to(dtype)[None])
    out = attend(*qkv, scale, terms[None], allowed[None, None], weights)
    return out[0].to(q.dtype)


def _sequence_positions(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """(sequence, position within it) of each of the ``total`` packed tokens; empty sequences own none."""
    tokens = torch.arange(total, device=cu_seqlens.device)
    sequence = torch.searchsorted(cu_seqlens, tokens, right=True) - 1
    return sequence, tokens - cu_seqlens[sequence]
