"""Splitting one sequence across the ranks of a context-parallel group, and putting it back together.

A group of N ranks shares a sequence of S tokens, S_local = S / N per rank, in one of two layouts:

* contiguous (``load_balance=False``): rank r holds tokens ``[r * S_local, (r + 1) * S_local)``.
  N = 4, S = 8:

      rank 0: 0 1 | rank 1: 2 3 | rank 2: 4 5 | rank 3: 6 7

* zig-zag (``load_balance=True``): the sequence is cut into 2N chunks of ``c = S_local / 2`` tokens and
  rank r holds chunk r followed by chunk 2N - 1 - r. N = 4, S = 16 (c = 2):

      rank 0: 0 1 14 15 | rank 1: 2 3 12 13 | rank 2: 4 5 10 11 | rank 3: 6 7 8 9

  Under a causal mask the queries of chunk i see (i + 1/2) chunks of keys, so with contiguous shards the
  last rank does 2N - 1 times the work of the first; pairing an early chunk with a late one gives every
  rank the same work (``sigattn/distributed/README.md``).

Everything position-dependent outside attention (RoPE, position embeddings, the loss's targets) must use
the global positions of the local tokens, ``shard_positions``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from ..validation import check_flag, describe


def _check_layout(seqlen: int, world_size: int, rank: int, load_balance: bool) -> None:
    for value, name in ((seqlen, "seqlen"), (world_size, "world_size"), (rank, "rank")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {describe(value)}")
    check_flag(load_balance, "load_balance")
    if seqlen < 0:
        raise ValueError(f"seqlen must be >= 0, got {seqlen}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size = {world_size}), got rank {rank}")
    parts = 2 * world_size if load_balance else world_size
    if seqlen % parts != 0:
        if load_balance:
            layout = f"zig-zag (load_balance=True): 2 * world_size = {parts} chunks"
        else:
            layout = f"contiguous: world_size = {parts} shards"
        raise ValueError(f"the sequence length ({seqlen}) must be a multiple of {parts}, {layout}")


def shard_positions(seqlen: int, world_size: int, rank: int, *, load_balance: bool = False, device=None) -> Tensor:
    """The global positions (int64, shape (seqlen / world_size,)) of the tokens rank ``rank`` holds, in
    the order it holds them: what RoPE or position embeddings need on this rank."""
    _check_layout(seqlen, world_size, rank, load_balance)
    if not load_balance:
        local = seqlen // world_size
        return torch.arange(rank * local, (rank + 1) * local, device=device)
    chunk = seqlen // (2 * world_size)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    last = torch.arange((2 * world_size - 1 - rank) * chunk, (2 * world_size - rank) * chunk, device=device)
    return torch.cat((first, last))


def shard_sequence(x: Tensor, world_size: int, rank: int, *, load_balance: bool = False, dim: int = 1) -> Tensor:
    """Rank ``rank``'s shard of the full sequence ``x`` (sequence along ``dim``; dim 1 in (B, S, H, D)).

    A view for the contiguous layout, a copy for zig-zag. Differentiable."""
    seqlen = x.shape[dim]
    _check_layout(seqlen, world_size, rank, load_balance)
    if not load_balance:
        local = seqlen // world_size
        return x.narrow(dim, rank * local, local)
    chunk = seqlen // (2 * world_size)
    return torch.cat(
        (x.narrow(dim, rank * chunk, chunk), x.narrow(dim, (2 * world_size - 1 - rank) * chunk, chunk)), dim=dim
    )


def unshard_sequence(shards: Sequence[Tensor], *, load_balance: bool = False, dim: int = 1) -> Tensor:
    """The full sequence from every rank's shard, ``shards[r]`` being rank r's. Differentiable."""
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("shards must hold one tensor per rank, got an empty sequence")
    lengths = {s.shape[dim] for s in shards}
    if len(lengths) != 1:
        raise ValueError(f"shards must all have the same length along dim {dim}, got {[s.shape[dim] for s in shards]}")
    if not load_balance:
        return torch.cat(list(shards), dim=dim)
    local = lengths.pop()
    if local % 2 != 0:
        raise ValueError(f"zig-zag shards (load_balance=True) hold two chunks: their length must be even, got {local}")
    chunk = local // 2
    firsts = [s.narrow(dim, 0, chunk) for s in shards]
    lasts = [s.narrow(dim, chunk, chunk) for s in reversed(shards)]
    return torch.cat(firsts + lasts, dim=dim)
