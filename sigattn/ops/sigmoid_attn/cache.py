"""Writing new keys and values into a KV cache in place, contiguous or paged.

Positions come from device tensors (no host synchronisation), so the append can run inside a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor


def append_positions(cache_seqlens: Tensor, num_new: int) -> Tensor:
    """(B, num_new) cache positions of the new tokens: cache_seqlens[b] + t."""
    return cache_seqlens.long()[:, None] + torch.arange(num_new, device=cache_seqlens.device)[None]


def append_kv(
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor,
    v: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None = None,
) -> None:
    """Write k, v (B, S_new, Hkv, D) into the caches at positions cache_seqlens[b] + t.

    A contiguous cache is (B, S_cache, Hkv, D); a paged cache (num_blocks, page_size, Hkv, D) is
    addressed through block_table (B, max_blocks): position p of row b lives in page
    block_table[b, p // page_size] at offset p % page_size."""
    batch, num_new = k.shape[:2]
    pos = append_positions(cache_seqlens, num_new)  # [B, S_new]
    if block_table is None:
        rows = torch.arange(batch, device=k.device)[:, None].expand(batch, num_new)
        index = (rows, pos)
    else:
        page_size = k_cache.shape[1]
        pages = block_table.long().gather(1, pos // page_size)
        index = (pages, pos % page_size)
    k_cache.index_put_(index, k)
    v_cache.index_put_(index, v)
