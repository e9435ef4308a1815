"""What every kernel launcher reads besides the tensors: the options of a call (``Params``) and where its
batch rows' tokens are (``Rows``). The bias travels beside them in its one form, ``reference.Bias`` (a
float, a per-head tensor that receives a gradient, or None: -log of each row's key count), because a
tensor bias is an autograd input."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .dropout import Dropout
from .reference import UNMASKED, Mask


class Params(NamedTuple):
    """The options of one call besides its tensors' data. ``deterministic``: the backward must be
    bit-identical across runs (as it is whenever torch.use_deterministic_algorithms is on). ``dropout``:
    attention dropout (its probability and seed tensor), None without."""

    scale: float
    mask: Mask = UNMASKED
    deterministic: bool = False
    dropout: Dropout | None = None


class Rows(NamedTuple):
    """Where batch row b's tokens are. Dense: (B, S, H, D) tensors. Varlen: packed (total, H, D) tensors,
    sequence b at tokens cu_seqlens[b]:cu_seqlens[b + 1]. KV cache: (B, Sq, Hq, D) queries against the first
    seqlens_k[b] keys of a (B, capacity, Hkv, D) cache, or of a paged one read through block_table."""

    batch: int
    seqlen_q: int  # the length, or for varlen the longest sequence (it only sizes the grid)
    seqlen_k: int  # the length, the longest sequence, or the cache's capacity
    cu_seqlens_q: Tensor | None = None
    cu_seqlens_k: Tensor | None = None
    seqlens_k: Tensor | None = None
    block_table: Tensor | None = None

    @classmethod
    def dense(cls, q: Tensor, k: Tensor) -> Rows:
        """The rows of (B, Sq, Hq, D) queries and (B, Sk, Hkv, D) keys."""
        return cls(q.shape[0], q.shape[1], k.shape[1])

    @classmethod
    def cache(cls, q: Tensor, k_cache: Tensor, seqlens_k: Tensor | None, block_table: Tensor | None) -> Rows:
        """(B, Sq, Hq, D) queries against a (B, capacity, Hkv, D) cache, or a paged (num_blocks, page_size,
        Hkv, D) one through block_table (B, max_blocks): capacity max_blocks * page_size."""
        capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
        return cls(q.shape[0], q.shape[1], capacity, seqlens_k=seqlens_k, block_table=block_table)

    @classmethod
    def packed(cls, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int) -> Rows:
        """Packed sequences; the int32 cumulative lengths must be dense (the kernels index them so)."""
        return cls(cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k)

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None
