"""The dense backward for Hopper (sm_90) at head dims 64 and 128, in Gluon: five products per tile, dQ added
into an fp32 workspace by TMA reductions (not deterministic: the additions land in any order).

The Triton backward is two kernels, dK/dV and dQ, and recomputes S and dP in both: seven products per tile
pair where FlashAttention-2/3 and cuDNN do five. Adding dQ from the dK/dV kernel needs a cheap reduction;
Triton 3.6 emits one atomic per element, which made it slower (benchmarks/NOTES.md). Here a program owns
128 keys of one kv head and walks the query tiles of every head of its GQA group:

* one loader warp copies the program's K and V once, then each tile's Q and dO into a ring of ``STAGES``;
* two consumer warpgroups each own 64 of the keys and compute, transposed so that Pᵀ and dSᵀ leave the
  score products in the register layout the next products read, Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (both issued
  asynchronously; the sigmoid of Sᵀ runs while dPᵀ is on the tensor cores), then dV += Pᵀ dO and
  dK += dSᵀ Q with dS = dP ⊙ P ⊙ (1 - P);
* each group writes its dSᵀ half to shared memory, and the groups take turns at dQ = dS K for a tile (all
  128 keys, both halves), which they hand to the TMA unit as a reduction into the fp32 workspace
  (``cp.reduce.async.bulk.tensor``), in two 64-column halves so the accumulator fits beside dK and dV.

The workspace is (B, Sq, Hq, D) fp32 within a budget (``_chunks``): longer calls run in chunks of batch rows
or kv heads (packed sequences: of kv heads, over (1, total, Hq, D)), so the backward holds at most 32 MiB
beyond its inputs and gradients from 8k keys on (more, in proportion, at shorter ones). dQ = scale x the
workspace, cast, once each chunk is done.

A per-head bias gets its gradient from the same products: the group whose turn it is at dQ also multiplies
the tile's dS by a block of ones (an 8-column product) and accumulates the sums per head. At D128 that
costs ~550 bytes of register spills and the kernel runs 0.89-0.99x the Triton backward with a per-head bias
(H200), so there the Triton kernels keep it; at D64 it is 1.01-1.16x faster than them
(benchmarks/results/hopper_backward_headbias_h200_2026-12-03.json).

Packed sequences (varlen) run here as in the forward (``hopper.py``): a tile past a sequence's end has
its keys and queries masked (P = 0 and dS = 0, so they add nothing to dK, dV or dQ), and the dK and dV
rows of a key tile that ends past it leave by register stores. A NaN or inf in one sequence must not reach
its neighbours through 0 x NaN, so the loader warp reads Q, dO, K and V through TMA descriptors of its
sequence alone, which it makes on the device (``sm90.sequence_descriptor``): past the end they load zeros.
(Zeroing the next sequence's rows in shared memory instead, from the loader warp, made the packed backward
17-19% slower on an H100: benchmarks/NOTES.md.) The dQ rows of a tile past the end, which belong to the next
sequence, are set to zero before the reduction adds them: an inf in this sequence's K or V makes them NaN.

It covers dense rows and packed sequences without ALiBi, full, causal or under a sliding window (packed
sequences: without a left bound). A program's query tiles run from the first whose rows see one of its keys
(a causal diagonal or a window's right bound) to the last (a window's left bound), so a window costs its
band. ``deterministic=True`` and every other call run on the Triton kernels (``unsupported`` says why), as
do calls of at most
``TRITON_UP_TO_QUERIES`` queries (for packed sequences: the longest), which are faster there.
"""

from __future__ import annotations

import torch
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from . import compat, host, sm90
from .params import Params, Rows
from .reference import Bias

KEYS = gl.constexpr(64)  # keys per consumer warpgroup: a program owns 2 * KEYS
ROWS = gl.constexpr(64)  # query rows per tile
DQ_COLS = gl.constexpr(64)  # dQ is computed and reduced in column blocks of this width
ONES = gl.constexpr(8)  # columns of the block of ones that sums dS (the narrowest wgmma)
# Q and dO ring depth per head dim: shared memory at D = 128 holds two stages (225 KiB of 227 in all).
STAGES = {64: 4, 128: 2}
HEAD_DIMS = tuple(STAGES)
HEAD_BIAS_HEAD_DIMS = (64,)  # with a per-head bias (module docstring)
# The fp32 dQ workspace of one launch: at most WORKSPACE_BYTES, times 8192 / Sk for shorter keys. Longer
# calls run in chunks; a chunk of 32 MiB is ~1.3 ms of work at 8k keys but 0.1 ms at 512, less than the host
# needs to launch it (~0.1 ms with its descriptors, zeroing and conversion).
WORKSPACE_BYTES = 32 << 20
WORKSPACE_KEYS = 8192
# A launch whose workspace fits in L2 (H100: 50 MB) can run causal key tiles heaviest first without
# losing the Q, dO and dQ rows shared by a head's tiles; a larger one keeps those tiles side by side.
L2_BYTES = 32 << 20
# Up to these query lengths, per (head dim, causal), the Triton backward is faster: a program's fixed cost
# (loading its 128 keys, storing their dK and dV) is shared by fewer query tiles. CUDA-graph replays on an
# H100 (bf16; 16k tokens, and shakespeare-char's 64 x 256 tokens x 6 heads of 64): Triton ahead by 4-27%
# at 128 and 256 queries and at 512 for D64 causal (11%), this kernel by 3-21% above
# (benchmarks/results/backward_short_sequences_h100_2026-11-25.json).
TRITON_UP_TO_QUERIES = {(64, True): 512, (64, False): 256, (128, True): 256, (128, False): 128}
MAX_GRID_ROWS = 65535  # CUDA's limit on a grid's y and z extents: batch rows per launch, key tiles
MAX_REGISTERS = sm90.MAX_REGISTERS
CONSUMER_REGISTERS, LOADER_REGISTERS = sm90.CONSUMER_REGISTERS, sm90.LOADER_REGISTERS


# The device code passes long argument lists packed to the line length, as triton_kernels.py does.
# fmt: off
@gluon.jit
def _add(a, b):
    # gl.sum's combine function is a triton.jit one, which the CPU tests' TRITON_INTERPRET=1 turns into an
    # interpreted function that Gluon cannot call.
    return a + b


@gluon.jit
def _program(HEAVY_FIRST: gl.constexpr):
    """(batch row, kv head) in the launch's chunk and key tile of this program. By default a head's key
    tiles run side by side, sharing its Q, dO and dQ rows in L2; with HEAVY_FIRST the key tile is the
    slowest grid axis, so the first tiles, which see the most queries under a causal mask, go first."""
    if HEAVY_FIRST:
        return gl.program_id(1), gl.program_id(0), gl.program_id(2)
    return gl.program_id(2), gl.program_id(1), gl.program_id(0)


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, kv_ready, row, k_row, h_kv):
    """The program's K and V halves, from token k_row of batch row ``row``."""
    for w in gl.static_range(2):
        compat.async_load(k_desc, [row, k_row + w * KEYS, h_kv, 0], kv_ready, k_smem.index(w))
        compat.async_load(v_desc, [row, k_row + w * KEYS, h_kv, 0], kv_ready, v_smem.index(w))


@gluon.jit
def _loader(q_desc, do_desc, k_desc, v_desc, q_ptr, do_ptr, k_ptr, v_ptr, cu_seqlens_q, cu_seqlens_k, k_smem,
            v_smem, q_bufs, do_bufs, kv_ready, q_ready, slot_free, b, h_kv, n0, q_start, q_lo, n_q, n_iter,
            GROUP: gl.constexpr, STAGES: gl.constexpr, VARLEN: gl.constexpr):
    """One warp: the program's K and V halves (from token n0), then Q and dO tile by tile (from token
    q_start), head by head of the group.

    With VARLEN, b is the packed sequence and the tokens count from its first. Tiles that may end past it
    load through descriptors of that sequence alone, so that they load zeros there, not the next sequence's
    rows; this warp makes them (and so fences them for its own reads). Making one costs about 3% of a 16 x 1k
    packed backward on an H100 (benchmarks/NOTES.md), so K and V take them only in the key tile that ends past
    the sequence; Q and dO always do, made while K and V load (choosing per tile, or sending the first tiles
    ahead through the packed tensors' descriptors, made ptxas spill in the consumers: 1.26-1.28x)."""
    row = b
    mbarrier.expect(kv_ready, 4 * k_desc.block_type.nbytes)
    if VARLEN:
        first_q, seqlen_q, first_k, seqlen_k = sm90.sequence(cu_seqlens_q, cu_seqlens_k, b)
        row = 0
        if n0 + 2 * KEYS > seqlen_k:
            _load_kv(sm90.sequence_descriptor(k_desc, k_ptr, first_k, seqlen_k),
                     sm90.sequence_descriptor(v_desc, v_ptr, first_k, seqlen_k), k_smem, v_smem, kv_ready, 0, n0,
                     h_kv)
        else:
            _load_kv(k_desc, v_desc, k_smem, v_smem, kv_ready, 0, first_k + n0, h_kv)
        q_desc = sm90.sequence_descriptor(q_desc, q_ptr, first_q, seqlen_q)
        do_desc = sm90.sequence_descriptor(do_desc, do_ptr, first_q, seqlen_q)
    else:
        _load_kv(k_desc, v_desc, k_smem, v_smem, kv_ready, b, n0, h_kv)
    for t in range(n_iter):
        slot = t % STAGES
        h = h_kv * GROUP + t // n_q
        m0 = q_start + (q_lo + t % n_q) * ROWS
        # A fresh mbarrier counts as having completed the phase before 0: the first round does not wait.
        mbarrier.wait(slot_free.index(slot), ((t // STAGES) & 1) ^ 1)
        mbarrier.expect(q_ready.index(slot), 2 * q_desc.block_type.nbytes)
        compat.async_load(q_desc, [row, m0, h, 0], q_ready.index(slot), q_bufs.index(slot))
        compat.async_load(do_desc, [row, m0, h, 0], q_ready.index(slot), do_bufs.index(slot))


@gluon.jit
def _store_tiles(dk_desc, dv_desc, out_k, out_v, dk, dv, b, n0, h):
    """TMA stores of a group's dK and dV rows, staged in the Q and dO ring, which is free once both groups
    are past every tile (a dense row's rows past Sk are clipped by the descriptor)."""
    dtype: gl.constexpr = out_k.dtype
    out_k.reshape(dk.shape).store(dk.to(dtype))
    out_v.reshape(dv.shape).store(dv.to(dtype))
    fence_async_shared()
    compat.async_store(dk_desc, [b, n0, h, 0], out_k)
    compat.async_store(dv_desc, [b, n0, h, 0], out_v)
    tma.store_wait(0)


@gluon.jit
def _consumer(dq_desc, dk_desc, dv_desc, k_smem, v_smem, q_bufs, do_bufs, ds_smem, dq_smem, ones_smem,
              kv_ready, q_ready, slot_free, ds_ready, ds_free, done, head_bias_ptr, dbias_ptr, num_heads,
              b0, h0, n0, q_lo, n_q, n_iter, mask_end, seqlen_q, seqlen_k, diag_offset, lo_offset, scale, half_scale,
              half_bias, alibi_ptr, stride_alibi_b, key_offset, cu_seqlens_q, cu_seqlens_k, dk_ptr, dv_ptr,
              W: gl.constexpr, GROUP: gl.constexpr, CAUSAL: gl.constexpr, LEFT: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, HEAVY_FIRST: gl.constexpr, HEAD_BIAS: gl.constexpr, VARLEN: gl.constexpr,
              TAIL: gl.constexpr, ALIBI: gl.constexpr):
    """One warpgroup: keys n0 + 64 W .. + 63 against every query tile; its dK and dV rows, the dQ of
    every other tile, and with HEAD_BIAS its sum of dS per head into dbias_ptr[b, h, key tile, W]."""
    dtype: gl.constexpr = q_bufs.dtype
    b_ws, h_ws, key_tile = _program(HEAVY_FIRST)  # (read again: fewer live registers than passing them)
    # Where the batch row's tokens are: (row of the workspace, first query, first key); packed sequences
    # share row 0.
    b_dq = b_ws
    q_start = 0
    if VARLEN:
        q_start, seqlen_q, k_start, seqlen_k = sm90.sequence(cu_seqlens_q, cu_seqlens_k, b0 + b_ws)
        key_offset += seqlen_k - seqlen_q
        b_dq = 0
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, ROWS, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQ_COLS, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    DQ_BLOCKS: gl.constexpr = HEAD_DIM // DQ_COLS
    s_zero = gl.zeros([KEYS, ROWS], gl.float32, s_layout)
    dq_zero = gl.zeros([ROWS, DQ_COLS], gl.float32, dq_layout)
    dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, kv_layout)
    key = n0 + W * KEYS + gl.arange(0, KEYS, layout=gl.SliceLayout(1, s_layout))
    # With HEAD_BIAS, the tensor cores sum dS: the tiles this group computes dQ for, times a block of ones.
    # 4 registers and no work per score (a sum of each score tile in registers cost 11% at D64).
    sum_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, ONES, 16])
    sum_zero = gl.zeros([ROWS, ONES], gl.float32, sum_layout)
    dsum = sum_zero
    if HEAD_BIAS:
        ones = ones_smem.index(W)
        ones.store(gl.full([KEYS, ONES], 1.0, dtype, gl.BlockedLayout([1, 1], [32, 1], [4, 1], [1, 0])))
        fence_async_shared()
    k = k_smem.index(W).reshape([KEYS, HEAD_DIM])
    v = v_smem.index(W).reshape([KEYS, HEAD_DIM])
    mbarrier.wait(kv_ready, 0)
    for t in range(n_iter):
        slot = t % STAGES
        m0 = (q_lo + t % n_q) * ROWS
        if HEAD_BIAS:
            h = (h0 + h_ws) * GROUP + t // n_q
            half_bias = 0.5 * gl.load(head_bias_ptr + h).to(gl.float32)
        if ALIBI:
            slope_ptr = alibi_ptr + (b0 + b_ws) * stride_alibi_b + (h0 + h_ws) * GROUP + t // n_q
            half_slope = 0.5 * gl.load(slope_ptr).to(gl.float32)
        mbarrier.wait(q_ready.index(slot), (t // STAGES) & 1)
        q = q_bufs.index(slot).reshape([ROWS, HEAD_DIM])
        do = do_bufs.index(slot).reshape([ROWS, HEAD_DIM])
        st = warpgroup_mma(k, q.permute((1, 0)), s_zero, use_acc=False, is_async=True)  # Sᵀ [keys, rows]
        dpt = warpgroup_mma(v, do.permute((1, 0)), s_zero, use_acc=False, is_async=True)  # dPᵀ
        st = warpgroup_mma_wait(1, deps=(st,))
        # P = 0.5 tanh(z / 2) + 0.5 with one tanh.approx per score; P (1 - P) = 0.25 (1 - tanh²).
        zt = st * half_scale + half_bias
        if ALIBI:  # less half_slope |i + key_offset - j|
            within_row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, s_layout)).to(gl.float32)
            within_key = gl.arange(0, KEYS, layout=gl.SliceLayout(1, s_layout)).to(gl.float32)
            distance = (m0 + key_offset - n0 - W * KEYS).to(gl.float32) + within_row[None, :] - within_key[:, None]
            zt = zt - half_slope * gl.abs(distance)
        th = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [zt], dtype=gl.float32, is_pure=True,
                                       pack=1)
        if CAUSAL:  # noqa: SIM102 (a separate `if` on the constexpr: full attention compiles without it)
            if m0 < mask_end:
                row = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(0, s_layout))
                th = gl.where(key[:, None] <= row[None, :] + diag_offset, th, -1.0)  # P = 0 and dS = 0
        if LEFT:  # noqa: SIM102 (rows whose window starts after the program's first key)
            if m0 + ROWS - 1 + lo_offset > n0:
                row = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(0, s_layout))
                th = gl.where(key[:, None] >= row[None, :] + lo_offset, th, -1.0)
        if TAIL:  # noqa: SIM102
            # Keys and queries past the ends: a packed sequence's are the next sequence's; a dense row's load as
            # zeros, whose scores are NaN against a row holding an inf.
            if (m0 + ROWS > seqlen_q) | (n0 + 2 * KEYS > seqlen_k):
                row = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(0, s_layout))
                th = gl.where((key[:, None] < seqlen_k) & (row[None, :] < seqlen_q), th, -1.0)
        pt = gl.convert_layout((0.5 * th + 0.5).to(dtype), a_layout)
        dv = warpgroup_mma(pt, do, dv, is_async=True)
        dpt = warpgroup_mma_wait(1, deps=(dpt,))
        dst = (dpt * (0.25 - 0.25 * th * th)).to(dtype)
        # dSᵀ halves are double-buffered: a half waits for the dQ of the tile two back to have read it.
        ds_slot = t % 2
        mbarrier.wait(ds_free.index(ds_slot), ((t // 2) & 1) ^ 1)
        ds_smem.index(2 * ds_slot + W).store(dst)
        fence_async_shared()
        mbarrier.arrive(ds_ready.index(ds_slot), count=1)
        dsa = gl.convert_layout(dst, a_layout)
        dk = warpgroup_mma(dsa, q, dk, is_async=True)
        dk, dv, _, _ = warpgroup_mma_wait(0, deps=(dk, dv, pt, dsa))
        mbarrier.arrive(slot_free.index(slot), count=1)
        if t % 2 == W:  # this group's turn: dQ = dS K over all 128 keys
            mbarrier.wait(ds_ready.index(ds_slot), (t // 2) & 1)
            tma.store_wait(0)  # its previous reductions have read dq_smem
            for c in gl.static_range(DQ_BLOCKS):
                k0 = k_smem.index(0).reshape([KEYS, HEAD_DIM]).slice(c * DQ_COLS, DQ_COLS, dim=1)
                k1 = k_smem.index(1).reshape([KEYS, HEAD_DIM]).slice(c * DQ_COLS, DQ_COLS, dim=1)
                dq = warpgroup_mma(ds_smem.index(2 * ds_slot).permute((1, 0)), k0, dq_zero, use_acc=False,
                                   is_async=True)
                dq = warpgroup_mma(ds_smem.index(2 * ds_slot + 1).permute((1, 0)), k1, dq, is_async=True)
                dq = warpgroup_mma_wait(0, deps=(dq,))
                if VARLEN:  # noqa: SIM102
                    if m0 + ROWS > seqlen_q:  # the rows past the end are the next sequence's dQ: add zeros
                        dq_row = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, dq_layout))
                        dq = gl.where((dq_row < seqlen_q)[:, None], dq, 0.0)
                dq_smem.index(DQ_BLOCKS * W + c).reshape([ROWS, DQ_COLS]).store(dq)
            if HEAD_BIAS:
                dsum = warpgroup_mma(ds_smem.index(2 * ds_slot).permute((1, 0)), ones, dsum, is_async=True)
                dsum = warpgroup_mma(ds_smem.index(2 * ds_slot + 1).permute((1, 0)), ones, dsum, is_async=True)
                dsum = warpgroup_mma_wait(0, deps=(dsum,))
            mbarrier.arrive(ds_free.index(ds_slot), count=1)
            fence_async_shared()
            for c in gl.static_range(DQ_BLOCKS):
                compat.async_add(dq_desc, [b_dq, q_start + m0, h_ws * GROUP + t // n_q, c * DQ_COLS],
                                dq_smem.index(DQ_BLOCKS * W + c))
        if HEAD_BIAS:  # noqa: SIM102
            if t % n_q == n_q - 1:  # the head's last query tile: this group's sum (of every column: / ONES)
                n_key_tiles = gl.num_programs(2) if HEAVY_FIRST else gl.num_programs(0)
                partial = ((b0 + b_ws) * num_heads + h) * n_key_tiles + key_tile
                gl.store(dbias_ptr + partial * 2 + W, gl.reduce(gl.reduce(dsum, 1, _add), 0, _add) / ONES)
                dsum = sum_zero
    tma.store_wait(0)
    mbarrier.arrive(done, count=1)
    mbarrier.wait(done, 0)
    n_mine = n0 + W * KEYS
    if VARLEN:
        if n_mine + KEYS > seqlen_k:
            sm90.store_rows(dk_ptr, dk_desc, (dk * scale).to(dtype), k_start, n_mine, seqlen_k, h0 + h_ws, kv_layout)
            sm90.store_rows(dv_ptr, dv_desc, dv.to(dtype), k_start, n_mine, seqlen_k, h0 + h_ws, kv_layout)
        else:
            _store_tiles(dk_desc, dv_desc, q_bufs.index(W), do_bufs.index(W), dk * scale, dv, 0, k_start + n_mine,
                         h0 + h_ws)
    else:
        _store_tiles(dk_desc, dv_desc, q_bufs.index(W), do_bufs.index(W), dk * scale, dv, b0 + b_ws, n_mine,
                     h0 + h_ws)


# One compiled kernel for every chunk, per constexprs and dtypes (host.launch).
@gluon.jit(do_not_specialize=["num_heads", "b0", "h0", "seqlen_q", "seqlen_k", "diag_offset", "lo_offset", "q_shift",
                              "stride_alibi_b", "key_offset"],
           do_not_specialize_on_alignment=["q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr",
                                           "head_bias_ptr", "dbias_ptr", "alibi_ptr", "cu_seqlens_q", "cu_seqlens_k"])
def sigmoid_attn_bwd_kernel_sm90(q_desc, k_desc, v_desc, do_desc, dq_desc, dk_desc, dv_desc, q_ptr, k_ptr, v_ptr,
                                 do_ptr, dk_ptr, dv_ptr, head_bias_ptr, dbias_ptr, cu_seqlens_q, cu_seqlens_k,
                                 num_heads, b0, h0, seqlen_q, seqlen_k, diag_offset, q_shift, scale, half_scale,
                                 half_scale_bias, lo_offset, alibi_ptr, stride_alibi_b, key_offset,
                                 GROUP: gl.constexpr, CAUSAL: gl.constexpr, LEFT: gl.constexpr, ALIBI: gl.constexpr,
                                 STAGES: gl.constexpr,
                                 HEAVY_FIRST: gl.constexpr, HEAD_BIAS: gl.constexpr, SEQUENCE_BIAS: gl.constexpr,
                                 VARLEN: gl.constexpr, TAIL: gl.constexpr):
    """One program: keys i_n * 128 .. + 127 of kv head h_kv of batch row b. Descriptors are 4-d
    (B, S, H, D) with blocks [1, 64, 1, D] ([1, 64, 1, 64] for the fp32 dQ workspace): keys past Sk and
    queries past Sq load as zeros, and so add nothing. A launch covers batch rows b0 + and kv heads h0 + its
    grid; the workspace holds only theirs. With HEAD_BIAS, head h's bias is head_bias_ptr[h] and dbias_ptr
    receives each consumer's sum of dS: (B, num_heads, key tiles, 2) fp32 values. Otherwise the bias is -log
    of the sequence's key count (0 with no key) with SEQUENCE_BIAS (packed sequences), else twice
    half_scale_bias.

    With VARLEN the tensors are packed sequences seen as (1, total, H, D) and the workspace as (1, total_q,
    heads, D); sequence b is at tokens cu_seqlens[b] .. cu_seqlens[b + 1] - 1 (bottom-right diagonal: its
    Sk - Sq is added to diag_offset),
    seqlen_q and seqlen_k are the longest lengths (unused). The program loads its sequence through
    descriptors of that sequence alone, made from q_ptr, k_ptr, v_ptr and do_ptr, so that its tiles past the
    end load zeros; dk_ptr and dv_ptr address the rows of a key tile that ends past its sequence. (All six are
    None for dense rows.)

    Query i sees key j where j <= i + diag_offset with CAUSAL (a causal diagonal, or a window's right bound
    folded into it) and j >= i + lo_offset with LEFT (a window's left bound); dense rows' keys count from
    the first some query sees (the host passes descriptors from there).

    With ALIBI the logit gains -alibi_ptr[b * stride_alibi_b + h] |i + key_offset - j| (key_offset: the
    diagonal's, without a window's right bound; with VARLEN the sequence's Sk - Sq is added).

    TAIL: queries or keys end inside a tile (always with VARLEN), whose rows past the end are masked.
    q_shift: q_desc and do_desc describe dense rows from query q_shift on, so that the queries before it,
    which see no key (a causal diagonal below the top-left corner), load as zeros (at negative coordinates);
    they end at the last query that sees one (a window's left bound)."""
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
    b_ws, h_ws, i_n = _program(HEAVY_FIRST)
    b, h_kv = b0 + b_ws, h0 + h_ws
    n0 = i_n * 2 * KEYS
    half_bias = half_scale_bias
    if VARLEN:
        q_start, seqlen_q, k_start, seqlen_k = sm90.sequence(cu_seqlens_q, cu_seqlens_k, b)
        diag_offset += seqlen_k - seqlen_q
        if n0 >= seqlen_k:  # the grid is sized for the longest sequence
            return
        if SEQUENCE_BIAS:
            half_bias = sm90.sequence_half_bias(seqlen_k)
    q_hi = gl.cdiv(seqlen_q, ROWS)
    q_lo = 0
    mask_end = 0
    if CAUSAL:
        # From the first tile whose rows see a key of the program (at least one tile, when there are any:
        # keys no query sees get zero gradients from a fully masked one); tiles from mask_end on see all
        # 128 keys.
        q_lo = gl.maximum(gl.minimum(gl.maximum(n0 - diag_offset, 0) // ROWS, q_hi - 1), 0)
        mask_end = n0 + 2 * KEYS - 1 - diag_offset
    if LEFT:  # to the last tile whose rows see a key of the program (at least one tile)
        q_hi = gl.maximum(gl.minimum(q_hi, gl.maximum(n0 + 2 * KEYS - 1 - lo_offset, 0) // ROWS + 1), q_lo + 1)
    n_q = q_hi - q_lo

    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2] + v_desc.block_type.shape, v_desc.layout)
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_bufs = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([KEYS, ROWS], q_desc.dtype)
    ds_smem = gl.allocate_shared_memory(q_desc.dtype, [4, KEYS, ROWS], ds_layout)  # [tile parity, group]
    dq_smem = gl.allocate_shared_memory(dq_desc.dtype, [2 * (HEAD_DIM // DQ_COLS)] + dq_desc.block_type.shape,
                                        dq_desc.layout)
    ones_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([KEYS, ONES], q_desc.dtype)
    ones_smem = gl.allocate_shared_memory(q_desc.dtype, [2, KEYS, ONES], ones_layout)  # one per consumer
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    slot_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    mbarrier.init(done, count=2)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(slot_free.index(i), count=2)  # both groups release a slot
    for i in gl.static_range(2):
        mbarrier.init(ds_ready.index(i), count=2)  # both halves written
        mbarrier.init(ds_free.index(i), count=1)  # read by the group whose turn it was

    # W, the eleventh to last argument of a consumer: which 64 of the keys its group owns.
    gl.warp_specialize([
        (_consumer, (dq_desc, dk_desc, dv_desc, k_smem, v_smem, q_bufs, do_bufs, ds_smem, dq_smem, ones_smem,
                     kv_ready, q_ready, slot_free, ds_ready, ds_free, done,
                     head_bias_ptr, dbias_ptr, num_heads, b0, h0, n0, q_lo, n_q, n_q * GROUP, mask_end, seqlen_q,
                     seqlen_k, diag_offset, lo_offset,
                     scale, half_scale, half_bias, alibi_ptr, stride_alibi_b, key_offset, cu_seqlens_q, cu_seqlens_k,
                     dk_ptr, dv_ptr, 0, GROUP, CAUSAL, LEFT, HEAD_DIM, STAGES, HEAVY_FIRST, HEAD_BIAS, VARLEN, TAIL,
                     ALIBI)),
        (_consumer, (dq_desc, dk_desc, dv_desc, k_smem, v_smem, q_bufs, do_bufs, ds_smem, dq_smem, ones_smem,
                     kv_ready, q_ready, slot_free, ds_ready, ds_free, done,
                     head_bias_ptr, dbias_ptr, num_heads, b0, h0, n0, q_lo, n_q, n_q * GROUP, mask_end, seqlen_q,
                     seqlen_k, diag_offset, lo_offset,
                     scale, half_scale, half_bias, alibi_ptr, stride_alibi_b, key_offset, cu_seqlens_q, cu_seqlens_k,
                     dk_ptr, dv_ptr, 1, GROUP, CAUSAL, LEFT, HEAD_DIM, STAGES, HEAVY_FIRST, HEAD_BIAS, VARLEN, TAIL,
                     ALIBI)),
        (_loader, (q_desc, do_desc, k_desc, v_desc, q_ptr, do_ptr, k_ptr, v_ptr, cu_seqlens_q, cu_seqlens_k, k_smem,
                   v_smem, q_bufs, do_bufs, kv_ready, q_ready, slot_free, b, h_kv, n0, -q_shift, q_lo, n_q,
                   n_q * GROUP, GROUP, STAGES, VARLEN)),
    ], [4, 1], [CONSUMER_REGISTERS, LOADER_REGISTERS])
# fmt: on


def unsupported(
    do: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grads: tuple[Tensor, ...] | None,
    params: Params,
    bias: Bias,
    rows: Rows,
) -> str | None:
    """Why this kernel does not run a backward (on an sm_90 GPU; ``kernels.py`` checks the device), or None
    if it does: head dim 64 or 128 (64 with a per-head bias), a non-deterministic backward allowed, a
    diagonal at the bottom right for packed sequences, a full or causal mask, no dropout, at least one key and
    query, more queries than
    ``TRITON_UP_TO_QUERIES`` (shorter calls are faster on the Triton kernels), and what
    ``host.unsupported_common`` asks. ``do`` or ``grads`` None: buffers laid out like ``q, k, v``'s fresh
    copies, which TMA can address."""
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim}, not one of {HEAD_DIMS}"
    if params.deterministic or torch.are_deterministic_algorithms_enabled():
        return "deterministic: dQ is reduced by atomic additions"
    if isinstance(bias, Tensor) and head_dim not in HEAD_BIAS_HEAD_DIMS:
        return f"per-head bias at head dim {head_dim}: the Triton backward is faster"
    if rows.varlen and params.mask.top_left:
        return "packed sequences with the causal diagonal at the top left"
    if params.dropout is not None:
        return "attention dropout"
    if host.cdiv(rows.seqlen_k, 2 * int(KEYS)) > MAX_GRID_ROWS:
        return f"{rows.seqlen_k} keys: more than {MAX_GRID_ROWS} tiles of {2 * int(KEYS)}"
    if rows.varlen and params.mask.bounds[0] >= 0:
        return f"packed sequences with a window's left bound ({params.mask.bounds})"
    reason = host.unsupported_common(q, k, v, (q, k, v, do, *(grads or ())))
    if reason is None and q.shape[-3] == 0:
        return "no queries"
    shortest = TRITON_UP_TO_QUERIES[(head_dim, params.mask.bounds[1] >= 0)]
    if reason is None and rows.seqlen_q <= shortest:
        return f"{rows.seqlen_q} queries: the Triton backward is faster up to {shortest}"
    return reason


def _chunks(batch: int, num_kv_heads: int, per_kv_head: int, seqlen_k: int) -> tuple[int, int]:
    """(batch rows, kv heads) per launch, so the workspace stays within its budget (at least one kv head
    of one row) and the grid within CUDA's 65535 rows."""
    budget = WORKSPACE_BYTES * max(1, WORKSPACE_KEYS // max(seqlen_k, 1))
    if per_kv_head * num_kv_heads <= budget:
        return max(1, min(batch, MAX_GRID_ROWS, budget // (per_kv_head * num_kv_heads))), num_kv_heads
    return 1, max(1, budget // per_kv_head)


def backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grads: tuple[Tensor, Tensor, Tensor],
    params: Params,
    bias: Bias,
    alibi: Tensor | None,
    rows: Rows,
) -> Tensor | None:
    """Writes (dq, dk, dv) of ``hopper.forward``'s attention into ``grads``; returns the gradient of a
    per-head bias (None without one). ``alibi``: contiguous (H,) or (B, H) slopes, or None."""
    do, q, k, v, *grads = host.batch_rows(rows, do, q, k, v, *grads)
    varlen = rows.varlen
    scale, (left, right) = params.scale, params.mask.bounds
    causal, window_left = right >= 0, left >= 0  # the kernel's CAUSAL (any right bound) and LEFT
    head_bias = bias if isinstance(bias, Tensor) else None
    dq, dk, dv = grads
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    per_kv_head = seqlen_q * group * head_dim * 4  # workspace bytes per kv head of a tensor row
    if not varlen:
        rows_per_launch, kv_heads_per_launch = _chunks(batch, num_kv_heads, per_kv_head, seqlen_k)
        workspace_rows = rows_per_launch
    else:  # one launch covers every sequence; the tensors and the workspace have one row
        seqlen_q, seqlen_k = rows.seqlen_q, rows.seqlen_k
        batch = rows_per_launch = rows.batch
        kv_heads_per_launch = _chunks(1, num_kv_heads, per_kv_head, seqlen_k)[1]
        workspace_rows = 1
    sequence_bias = bias is None
    half_bias = 0.5 * bias if isinstance(bias, float) else 0.0
    workspace = torch.zeros(
        workspace_rows, q.shape[1], kv_heads_per_launch * group, head_dim, dtype=torch.float32, device=q.device
    )
    tile_rows, keys = int(ROWS), int(KEYS)
    at = host.diagonals(params.mask, seqlen_q, seqlen_k, varlen)  # (packed: no left bound, ``unsupported``)
    # Dense rows' Q and dO descriptors cover only the queries that see a key (the same ones whether keys count
    # from 0 or from at.first: no query sees a key before it); dK and dV of the keys before at.first are 0.
    q_shift, q_end = 0, None
    if not varlen:
        q_shift, q_end = host.visible_queries(seqlen_q, at.seqlen_k, at.key_offset, params.mask.bounds)
    if at.first:
        dk[:, : at.first].zero_()
        dv[:, : at.first].zero_()
    tail = varlen or seqlen_q % tile_rows != 0 or at.seqlen_k % (2 * keys) != 0
    descriptors = (
        host.descriptor(q[:, q_shift:q_end], tile_rows),
        host.descriptor(k[:, at.first : at.seen], keys),
        host.descriptor(v[:, at.first : at.seen], keys),
        host.descriptor(do[:, q_shift:q_end], tile_rows),
        host.descriptor(workspace, tile_rows, int(DQ_COLS)),
        host.descriptor(dk[:, at.first :], keys),
        host.descriptor(dv[:, at.first :], keys),
    )
    key_tiles = host.cdiv(at.seqlen_k, 2 * keys)
    # Every (row, head, key tile, consumer) sum of dense rows is written; a packed sequence's tiles past its
    # end write nothing.
    dbias = None
    if head_bias is not None:
        dbias = (torch.zeros if varlen else torch.empty)(batch, num_heads, key_tiles, 2, device=q.device)
    # (A window's key tiles see as many queries each.)
    heavy_first = params.mask.causal_only and workspace.numel() * 4 <= L2_BYTES
    stages = STAGES[head_dim]
    key = (
        head_dim,
        *(t.dtype for t in (q, k, v, do, dk, dv)),
        group,
        causal,
        window_left,
        None if alibi is None else alibi.dtype,
        stages,
        heavy_first,
        None if head_bias is None else head_bias.dtype,
        sequence_bias,
        varlen,
        tail,
    )
    packed = (q, k, v, do, dk, dv) if varlen else (None,) * 6
    for b0 in range(0, batch, rows_per_launch):
        for h0 in range(0, num_kv_heads, kv_heads_per_launch):
            n_rows, n_kv_heads = min(rows_per_launch, batch - b0), min(kv_heads_per_launch, num_kv_heads - h0)
            grid = (n_kv_heads, n_rows, key_tiles) if heavy_first else (key_tiles, n_kv_heads, n_rows)
            args = (
                *descriptors,
                *packed,
                head_bias,
                dbias,
                rows.cu_seqlens_q,
                rows.cu_seqlens_k,
                num_heads,
                b0,
                h0,
                seqlen_q,
                at.seqlen_k,
                at.diag_offset,
                q_shift,
                scale,
                0.5 * scale,
                half_bias,
                at.lo_offset,
                alibi,
                alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0,
                at.key_offset,
                group,
                causal,
                window_left,
                alibi is not None,
                stages,
                heavy_first,
                head_bias is not None,
                sequence_bias,
                varlen,
                tail,
            )
            if b0 or h0:
                workspace.zero_()
            if key_tiles:
                host.launch(sigmoid_attn_bwd_kernel_sm90, grid, args, key, num_warps=4, maxnreg=MAX_REGISTERS)
            heads = slice(h0 * group, (h0 + n_kv_heads) * group)
            tensor_rows = min(n_rows, workspace_rows)
            torch.mul(workspace[:tensor_rows, :, : n_kv_heads * group], scale, out=dq[b0 : b0 + tensor_rows, :, heads])
    return None if dbias is None else dbias.sum(dim=(0, 2, 3)).to(head_bias.dtype)
