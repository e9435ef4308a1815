"""Ulysses attention (DeepSpeed-Ulysses): all-to-all from sequence shards to head shards and back.

Rank r of N holds q, k, v for S / N tokens and all heads. One all-to-all (q, k and v packed into one
message) gives every rank the whole sequence for its N-th of the heads; it runs ordinary single-device
``sigmoid_attn_func`` on them; a second all-to-all returns the output to sequence shards. The backward is
the same two all-to-alls in reverse (autograd through ``_AllToAll``), so the whole sequence's attention of
a head runs on one device: masks and the default bias need nothing special.

Heads are split across the group: Hq must be a multiple of N. With GQA, rank g gets query heads
``[g Hq/N, (g+1) Hq/N)`` and must hold the key/value heads they read; when Hkv is not a multiple of N, each
key/value head is repeated r times first (``kv_head_repeats``: the smallest r that divides Hq / Hkv with
Hkv * r a multiple of N), which sends r times the K/V traffic. MQA on 8 ranks repeats the one head 8 times.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional import sigmoid_attn_func
from .checks import ShardedCall, check_sharded_call
from .sharding import shard_positions


def kv_head_repeats(heads: int, kv_heads: int, world_size: int) -> int:
    """How many times to repeat each key/value head so that the head groups split evenly over the ranks:
    the smallest r dividing ``heads // kv_heads`` with ``kv_heads * r`` a multiple of ``world_size``."""
    group = heads // kv_heads
    for r in range(1, group + 1):
        if group % r == 0 and (kv_heads * r) % world_size == 0:
            return r
    raise ValueError(
        f"the number of query heads ({heads}) must be a multiple of the group size ({world_size}) for Ulysses"
    )


def _seq_to_heads(x: Tensor, group, world_size: int) -> Tensor:
    """(B, S_local, H, D) sequence shards -> (B, world_size * S_local, H / world_size, D) head shards."""
    batch, seqlen, heads, dim = x.shape
    send = x.reshape(batch, seqlen, world_size, heads // world_size, dim).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)  # [N, B, S_local, H/N, D]: block i is rank i's tokens of my heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(batch, world_size * seqlen, heads // world_size, dim)


def _heads_to_seq(x: Tensor, group, world_size: int) -> Tensor:
    """The inverse of ``_seq_to_heads``: (B, S, H / world_size, D) -> (B, S / world_size, H, D)."""
    batch, seqlen, heads, dim = x.shape
    local = seqlen // world_size
    send = x.reshape(batch, world_size, local, heads, dim).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)  # [N, B, S_local, H/N, D]: block i is my tokens of rank i's heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(batch, local, world_size * heads, dim)


class _AllToAll(torch.autograd.Function):
    """``_seq_to_heads`` (``to_heads``) or ``_heads_to_seq``; the backward is the other one, itself through
    this function, so that a double backward (create_graph=True) differentiates it too (it is linear)."""

    @staticmethod
    def forward(ctx, x, group, world_size: int, to_heads: bool):
        ctx.group, ctx.world_size, ctx.to_heads = group, world_size, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, world_size)

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.group, ctx.world_size, not ctx.to_heads), None, None, None


def _pack_heads(tensors: list[Tensor], world_size: int) -> Tensor:
    """Concatenates (B, S, H_i, D) tensors along heads so that each rank's N-th of every tensor's heads is
    contiguous: one all-to-all then moves them all, and rank g receives [its q heads, k heads, v heads]."""
    batch, seqlen, _, dim = tensors[0].shape
    parts = [t.reshape(batch, seqlen, world_size, t.shape[2] // world_size, dim) for t in tensors]
    return torch.cat(parts, dim=3).reshape(batch, seqlen, sum(t.shape[2] for t in tensors), dim)


def _global_order(cp: ShardedCall, device) -> Tensor:
    """Global position of each token of the gathered sequence (the ranks' shards, in rank order)."""
    return torch.cat(
        [shard_positions(cp.seqlen, cp.world_size, r, load_balance=True, device=device) for r in range(cp.world_size)]
    )


def ulysses_sigmoid_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    causal: bool = False,
    bias: float | Tensor | None = None,
    scale: float | None = None,
    load_balance: bool = False,
) -> Tensor:
    """Sigmoid attention over a sequence sharded across ``group`` (default: the world), by Ulysses
    all-to-alls. Same arguments, result and gradients as ``ring_sigmoid_attn``; in addition the number of
    query heads must be a multiple of the group size (key/value heads are repeated where needed, see the
    module docstring).

    ``load_balance`` only selects the input layout: every rank computes the whole sequence for its heads,
    so the work is balanced either way. A zig-zag sequence is put in order (an index copy) only under a
    causal mask; without one, attention does not depend on the order of the tokens.

    A per-head bias tensor's gradient on each rank is nonzero only for the heads that rank computed; as
    for ``ring_sigmoid_attn``, the sum over the group is the single-process gradient.
    """
    fn = "ulysses_sigmoid_attn"
    cp = check_sharded_call(fn, q, k, v, group, causal=causal, bias=bias, scale=scale, load_balance=load_balance)
    world, heads, kv_heads = cp.world_size, q.shape[2], k.shape[2]
    if heads % world != 0:
        raise ValueError(
            f"{fn} splits the heads across the group: the number of query heads (q's dim 2 = {heads}) must be a "
            f"multiple of the group size ({world}); ring_sigmoid_attn has no such constraint"
        )
    repeats = kv_head_repeats(heads, kv_heads, world)
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
        kv_heads *= repeats

    packed = _AllToAll.apply(_pack_heads([q, k, v], world), cp.group, world, True)
    q_h, k_h, v_h = packed.split([heads // world, kv_heads // world, kv_heads // world], dim=2)
    reorder = causal and load_balance
    if reorder:
        order = _global_order(cp, q.device)
        to_global = torch.argsort(order)
        q_h, k_h, v_h = (t.index_select(1, to_global) for t in (q_h, k_h, v_h))

    local_bias = cp.bias
    if cp.head_bias is not None:
        per_rank = heads // world
        local_bias = cp.head_bias[cp.rank * per_rank : (cp.rank + 1) * per_rank]
    out = sigmoid_attn_func(q_h, k_h, v_h, bias=local_bias, scale=cp.scale, causal=causal)  # [B, S, Hq/N, D]
    if reorder:
        out = out.index_select(1, order)
    return _AllToAll.apply(out, cp.group, world, False)
