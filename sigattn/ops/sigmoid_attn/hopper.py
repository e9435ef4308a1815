"""The dense forward for Hopper (sm_90) at head dims 64 and 128, in Gluon, Triton's lower-level language.

Triton 3.6 warp-specialises only on Blackwell, and its scheduler leaves the tensor cores idle while a tile's
sigmoid runs: the plain Triton forward stays at 72-76% of the matmul peak at D = 128. This kernel schedules
by hand, as FlashAttention-3 does:

* one loader warp issues TMA copies of Q and of the K and V tiles into a ring of ``STAGES`` buffers,
  signalling each tile's arrival on an mbarrier; the consumers free a slot once its P V product is done;
* two to four consumer warpgroups (``CONFIGS``) each own 64 query rows and run unsynchronised, so the
  warp schedulers overlap one group's sigmoid with the others' matrix products; under a causal mask each
  group stops at its own diagonal, and a group whose rows are all past Sq computes nothing;
* within a group, the products of tile j (S = Q Kᵀ, then P V of tile j - 1) are issued asynchronously and
  only S is awaited: the sigmoid of tile j runs while P V of tile j - 1 is still on the tensor cores.

On an H100 (bf16, 16k tokens, hidden 2048, seqlen 2k-16k) the two-group kernel ran 626-689 TFLOP/s at
D = 128 full and 519-661 causal, against the Triton kernel's 552-558 and 451-540 and cuDNN's softmax
586-629 and 470-555 (benchmarks/results/hopper_forward_h100_2026-11-25.json). At D = 64 a tile's tanh
takes about as many cycles as its products: two groups stayed 10-17% behind the Triton kernel, three
caught up with it, four run 6-15% ahead (``CONFIGS``). An explicit ping-pong of the groups
(FlashAttention-3's) measured no better than leaving them to the schedulers.

It covers the forward of dense rows and of packed sequences (varlen) without ALiBi, under any mask: full,
causal, or a sliding window (left, right). A window's right bound is a causal diagonal moved right by it
(``CAUSAL`` with a larger ``diag_offset``); its left bound (``LEFT``) starts each program's key tiles at
the first its first rows see, so a window costs its band, not Sq x Sk: the groups of a program release
the tiles before their own first unread, and mask the tiles their rows' left edges cross. Packed sequences
take windows without a left bound only (``unsupported``). Every other call runs on the Triton kernels.

Packed sequences are one (1, total, H, D) row to TMA, so a tile that runs past a sequence's end loads the next
sequence's tokens: its keys are masked (P = 0; a dense row's keys past Sk load as zeros instead) and its
output rows leave by register stores, not a TMA store that would overwrite the next sequence's rows. Gluon
does not run in the Triton interpreter: the CPU tests compile it for sm_90a and check the dispatch rule, and
``python -m sigattn.testing.grid`` runs it on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

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

# (Constexprs: the kernels read them as globals.)
ROWS = gl.constexpr(64)  # query rows per consumer warpgroup
LOADER_REGISTERS = sm90.LOADER_REGISTERS


@dataclass(frozen=True)
class ForwardConfig:
    consumers: int  # consumer warpgroups: a program owns 64 x consumers query rows
    block_n: int  # keys per tile
    stages: int  # K and V tiles in flight

    @property
    def registers(self) -> tuple[int, int]:
        """(registers per thread at launch, per consumer thread): ``sm90.register_split``."""
        return sm90.register_split(self.consumers)


# Per (head dim, causal), from interleaved runs against the Triton forward on an H200 (bf16, 16k tokens,
# hidden 2048; benchmarks/results/hopper_forward_*_h200_2026-12-03.json). More consumer groups give the warp
# schedulers more groups to overlap with the others' products. D128 full: three groups 5-8% ahead of two from
# 512 to 16k tokens. D128 causal keeps two (three were even at 2k-16k and behind at 1k). Four spill at D128
# (584 bytes: its accumulators do not fit in 112 registers). D64: two groups were 7-15% behind Triton, three
# on its level, four 3-14% ahead of three at 1k-16k (full 4k 548 against 498 and Triton's 485 TFLOP/s,
# causal 4k 486 against 458 and 436; ..._consumers4_d64_...).
# On an H100 64-wide key tiles in a ring of 4 beat 3 stages (626-689 TFLOP/s against 611-672) and 128-wide
# tiles (512-562; hopper_forward_h100_2026-11-25.json); at D64 128-wide tiles were 10-20% slower here too.
CONFIGS = {
    (128, False): ForwardConfig(3, 64, 4),
    (128, True): ForwardConfig(2, 64, 4),
    (64, False): ForwardConfig(4, 64, 4),
    (64, True): ForwardConfig(4, 64, 4),
}
HEAD_DIMS = tuple(sorted({head_dim for head_dim, _ in CONFIGS}))


# The device code passes long argument lists packed to the line length, as triton_kernels.py does.
# fmt: off
@gluon.jit
def _key_tiles(m0, seqlen_k, diag_offset, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
               KEY_TAIL: gl.constexpr):
    """(key tiles to visit, tiles before the first one that needs a mask) for the query rows m0 .. m0 +
    BLOCK_M - 1. At least one tile, so rows with no allowed key still write their zeros. The causal diagonal
    is masked, and with KEY_TAIL (keys that end inside a tile) the last partial tile: a packed sequence's
    keys past its end are the next sequence's, and a dense row's keys past Sk load as zeros, whose score is
    NaN against a query holding an inf."""
    if CAUSAL:
        hi = gl.minimum(seqlen_k, m0 + BLOCK_M + diag_offset)
        n_unmasked = gl.maximum(m0 + diag_offset + 1, 0) // BLOCK_N
    else:
        hi = seqlen_k
        n_unmasked = gl.cdiv(seqlen_k, BLOCK_N)
    if KEY_TAIL:
        n_unmasked = gl.minimum(n_unmasked, seqlen_k // BLOCK_N)
    return gl.maximum(gl.cdiv(hi, BLOCK_N), 1), n_unmasked


@gluon.jit
def _window_tiles(m0, lo_offset, end, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """(first key tile to visit, first tile that needs no left mask) for the query rows m0 .. m0 + BLOCK_M - 1
    under a window's left bound (row i sees keys from i + lo_offset on). The first tile is at most end - 1,
    so rows with no key in reach still visit one, masked, and write their zeros."""
    first = gl.minimum(gl.maximum(m0 + lo_offset, 0) // BLOCK_N, end - 1)
    return first, gl.cdiv(gl.maximum(m0 + BLOCK_M - 1 + lo_offset, 0), BLOCK_N)


@gluon.jit
def _probabilities(
    s,
    j,
    m0,
    seqlen_k,
    diag_offset,
    n_unmasked,
    lo_offset,
    lo_unmasked,
    half_scale,
    half_bias,
    half_slope,
    key_offset,
    s_layout: gl.constexpr,
    p_layout: gl.constexpr,
    ROWS: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    LEFT: gl.constexpr,
    KEY_TAIL: gl.constexpr,
    VARLEN: gl.constexpr,
    ALIBI: gl.constexpr,
    dtype: gl.constexpr,
):
    """P = sigmoid(scale s + bias) of score tile j as the next product's register operand: 0.5 tanh(z / 2)
    + 0.5 with one tanh.approx per score; keys past the diagonal 0, with LEFT keys before i + lo_offset (in
    the tiles before lo_unmasked), and with KEY_TAIL keys past Sk. With ALIBI, z less half_slope |i +
    key_offset - j|: positions as float32 per row and per column, then a subtraction and an FMA a score."""
    z = s * half_scale + half_bias
    if ALIBI:
        row = gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout)).to(gl.float32)
        col = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)).to(gl.float32)
        distance = (m0 + key_offset - j * BLOCK_N).to(gl.float32) + row[:, None] - col[None, :]
        z = z - half_slope * gl.abs(distance)
    t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=gl.float32, is_pure=True, pack=1)
    p = 0.5 * t + 0.5
    if CAUSAL or KEY_TAIL or LEFT:  # noqa: SIM102 (a separate `if` on the constexprs: full attention compiles without it)
        masked = j >= n_unmasked
        if LEFT:
            masked = masked | (j < lo_unmasked)
        if masked:
            if compat.MASK_FROM_TILE_START or (VARLEN and compat.PACKED_MASK_FROM_TILE_START):
                # rows and keys counted from the tile's first key
                i = m0 - j * BLOCK_N + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
                k = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                end = seqlen_k - j * BLOCK_N
            else:
                i = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
                k = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                end = seqlen_k
            if LEFT:
                # Each row's bounds first, then two comparisons a score: a D64 causal window with a key tail
                # spilled 148 bytes at 112 registers with the three comparisons below.
                last = gl.full_like(i, end - 1)
                if CAUSAL:
                    last = gl.minimum(i + diag_offset, last) if KEY_TAIL else i + diag_offset
                allowed = (k[None, :] <= last[:, None]) & (k[None, :] >= i[:, None] + lo_offset)
            elif CAUSAL:
                allowed = k[None, :] <= i[:, None] + diag_offset
                if KEY_TAIL:
                    allowed = allowed & (k[None, :] < end)
            else:
                allowed = k[None, :] < end
            p = gl.where(allowed, p, 0.0)
    return gl.convert_layout(p.to(dtype), p_layout)


# The [8, 64] pieces ``zero_rows_from`` writes: 8 rows are the period of the 128-byte swizzle (a shared tile
# can be cut only at its multiples), 64 columns of 16 bits are 128 bytes; 4 values a thread of a warpgroup (a
# D64 forward consumer, at 112 registers, spilled with 8).
ZEROING_LAYOUT = gl.constexpr(gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0]))


@gluon.jit
def zero_rows_from(tile, first):
    """Zero the rows ``first`` on of a shared [rows, cols] tile, by a warpgroup: rows TMA loaded from past a
    packed sequence's end (the next sequence's), where a NaN would otherwise reach the products through
    0 x NaN. Then a fence, so that the tensor cores (the async proxy) see the zeros."""
    ROWS_: gl.constexpr = tile.shape[0]
    COLS: gl.constexpr = tile.shape[1]
    for r0 in gl.static_range(0, ROWS_, 8):
        if r0 + 8 > first:
            row = r0 + gl.arange(0, 8, layout=gl.SliceLayout(1, ZEROING_LAYOUT))
            keep = (row < first)[:, None]
            for c0 in gl.static_range(0, COLS, 64):
                piece = tile.slice(r0, 8, dim=0).slice(c0, 64, dim=1)
                zeros = gl.zeros([8, 64], tile.dtype, ZEROING_LAYOUT)
                piece.store(gl.where(keep, piece.load(ZEROING_LAYOUT), zeros))
    fence_async_shared()


@gluon.jit
def _loader(
    q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_ready, k_ready, v_ready, slot_free, b, h, h_kv, q0, k_start,
    t0, n_tiles, CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr
):
    """One warp: each consumer's Q rows (from token q0), then K and V tiles t0 .. n_tiles - 1 (tile j from
    token k_start + j BLOCK_N) into the ring, each as soon as its slot is free."""
    mbarrier.expect(q_ready, CONSUMERS * q_desc.block_type.nbytes)
    for w in gl.static_range(CONSUMERS):
        compat.async_load(q_desc, [b, q0 + w * ROWS, h, 0], q_ready, q_smem.index(w))
    for j in range(t0, n_tiles):
        r = j - t0  # the tile's place in the ring's sequence
        slot = r % STAGES
        n0 = k_start + j * BLOCK_N
        # A fresh mbarrier counts as having completed the phase before 0: the first round does not wait.
        mbarrier.wait(slot_free.index(slot), ((r // STAGES) & 1) ^ 1)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        compat.async_load(k_desc, [b, n0, h_kv, 0], k_ready.index(slot), k_bufs.index(slot))
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        compat.async_load(v_desc, [b, n0, h_kv, 0], v_ready.index(slot), v_bufs.index(slot))


@gluon.jit
def _release(k_ready, slot_free, r, STAGES: gl.constexpr):
    """Release ring position ``r`` unread, once its tile has loaded: an earlier arrival would count towards
    the release of the tile the slot holds now, which other groups may still be reading."""
    mbarrier.wait(k_ready.index(r % STAGES), (r // STAGES) & 1)
    mbarrier.arrive(slot_free.index(r % STAGES), count=1)


@gluon.jit
def _store_tile(o_desc, q_rows, value, b, row, h):
    """A TMA store of 64 output rows from token ``row`` on. Q is read no more: its buffer stages them (a
    dense row's rows past Sq are clipped by the descriptor)."""
    q_rows.reshape(value.shape).store(value)
    fence_async_shared()
    compat.async_store(o_desc, [b, row, h, 0], q_rows)
    tma.store_wait(0)


@gluon.jit
def _attend(
    o_desc, q_rows, k_bufs, v_bufs, q_ready, k_ready, v_ready, slot_free, b, h, m0, t0, seqlen_q, seqlen_k,
    diag_offset, lo_offset, half_scale, half_bias, half_slope, key_offset, q_start, o_ptr, HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, LEFT: gl.constexpr, VARLEN: gl.constexpr,
    KEY_TAIL: gl.constexpr, ALIBI: gl.constexpr
):
    """Query rows m0 .. m0 + 63 against the key tiles they see, of the program's ring from tile t0 on:
    releases the tiles before their first unread, writes their output, releases the tiles they read and
    returns the end of them."""
    dtype: gl.constexpr = q_rows.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    n_mine, n_unmasked = _key_tiles(m0, seqlen_k, diag_offset, ROWS, BLOCK_N, CAUSAL, KEY_TAIL)
    first = 0
    lo_unmasked = 0
    if LEFT:
        first, lo_unmasked = _window_tiles(m0, lo_offset, n_mine, ROWS, BLOCK_N)
        for j in range(t0, first):  # tiles only the program's earlier rows see
            _release(k_ready, slot_free, j - t0, STAGES)
    q = q_rows.reshape([ROWS, HEAD_DIM])
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)  # [64, D]

    mbarrier.wait(q_ready, 0)
    r = first - t0  # ring positions count from the program's first tile
    mbarrier.wait(k_ready.index(r % STAGES), (r // STAGES) & 1)
    k = k_bufs.index(r % STAGES).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
    s = warpgroup_mma(q, k, s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    p = _probabilities(s, first, m0, seqlen_k, diag_offset, n_unmasked, lo_offset, lo_unmasked, half_scale,
                       half_bias, half_slope, key_offset, s_layout, p_layout, ROWS, BLOCK_N, CAUSAL, LEFT, KEY_TAIL,
                       VARLEN, ALIBI, dtype)
    for j in range(first + 1, n_mine):
        r = j - t0
        slot, prev = r % STAGES, (r - 1) % STAGES
        mbarrier.wait(k_ready.index(slot), (r // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((r - 1) // STAGES) & 1)
        k = k_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        v = v_bufs.index(prev).reshape([BLOCK_N, HEAD_DIM])
        s_token = warpgroup_mma(q, k, s_zero, use_acc=False, is_async=True)  # [64, BN]
        acc_token = warpgroup_mma(p, v, acc, is_async=True)  # tile j - 1's P V
        s = warpgroup_mma_wait(1, deps=(s_token,))  # S done, P V still running
        p_next = _probabilities(s, j, m0, seqlen_k, diag_offset, n_unmasked, lo_offset, lo_unmasked, half_scale,
                                half_bias, half_slope, key_offset, s_layout, p_layout, ROWS, BLOCK_N, CAUSAL, LEFT,
                                KEY_TAIL, VARLEN, ALIBI, dtype)
        acc, _ = warpgroup_mma_wait(0, deps=(acc_token, p))
        mbarrier.arrive(slot_free.index(prev), count=1)
        p = p_next
    r = n_mine - 1 - t0
    last = r % STAGES
    mbarrier.wait(v_ready.index(last), (r // STAGES) & 1)
    v = v_bufs.index(last).reshape([BLOCK_N, HEAD_DIM])
    if VARLEN:  # noqa: SIM102 (the tile past the sequence's end, always a group's last: the next one's values)
        if (n_mine - 1) * BLOCK_N + BLOCK_N > seqlen_k:
            # Each group that reads the tile zeroes it: they write the same values, each fencing its own.
            zero_rows_from(v, seqlen_k - (n_mine - 1) * BLOCK_N)
    acc_token = warpgroup_mma(p, v, acc, is_async=True)
    acc, _ = warpgroup_mma_wait(0, deps=(acc_token, p))
    mbarrier.arrive(slot_free.index(last), count=1)
    if CAUSAL:  # noqa: SIM102
        if m0 + diag_offset < 0:  # rows that see no key output 0, whatever the values they mask hold
            row = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
            acc = gl.where((row + diag_offset >= 0)[:, None], acc, 0.0)
    if LEFT:  # noqa: SIM102 (rows whose window starts past the last key: top-left aligned, Sq > Sk)
        if m0 + ROWS - 1 + lo_offset >= seqlen_k:
            row = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
            acc = gl.where((row + lo_offset < seqlen_k)[:, None], acc, 0.0)
    if VARLEN:
        if m0 + ROWS > seqlen_q:
            sm90.store_rows(o_ptr, o_desc, acc.to(dtype), q_start, m0, seqlen_q, h, o_layout)
        else:
            _store_tile(o_desc, q_rows, acc.to(dtype), b, q_start + m0, h)
    else:
        _store_tile(o_desc, q_rows, acc.to(dtype), b, m0, h)
    return n_mine


@gluon.jit
def _consumer(shared, W: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, LEFT: gl.constexpr, VARLEN: gl.constexpr, KEY_TAIL: gl.constexpr,
              ALIBI: gl.constexpr):
    """One warpgroup: query rows m0 + 64 W .. + 63. The program's loader streams key tiles t0 .. n_tiles - 1,
    enough for its first and last rows; a group that needs fewer (its window starts later, its causal
    diagonal comes earlier, or its rows are past Sq) releases the others unread. ``shared``: the arguments
    every group gets (the kernel's tuple)."""
    (o_desc, q_smem, k_bufs, v_bufs, q_ready, k_ready, v_ready, slot_free, b, h, m0, t0, n_tiles, seqlen_q,
     seqlen_k, diag_offset, lo_offset, half_scale, half_bias, half_slope, key_offset, q_start, o_ptr) = shared
    m0 = m0 + W * ROWS
    n_mine = t0
    if m0 < seqlen_q:
        n_mine = _attend(o_desc, q_smem.index(W), k_bufs, v_bufs, q_ready, k_ready, v_ready, slot_free, b, h, m0,
                         t0, seqlen_q, seqlen_k, diag_offset, lo_offset, half_scale, half_bias, half_slope,
                         key_offset, q_start, o_ptr, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, LEFT, VARLEN, KEY_TAIL, ALIBI)
    for j in range(n_mine, n_tiles):
        _release(k_ready, slot_free, j - t0, STAGES)


# One compiled kernel per constexprs and dtypes (host.launch).
@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "diag_offset", "lo_offset", "key_offset", "stride_alibi_b"],
           do_not_specialize_on_alignment=["o_ptr", "head_bias_ptr", "alibi_ptr", "cu_seqlens_q", "cu_seqlens_k"])
def sigmoid_attn_fwd_kernel_sm90(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    o_ptr,
    head_bias_ptr,
    cu_seqlens_q,
    cu_seqlens_k,
    seqlen_q,
    seqlen_k,
    diag_offset,
    half_scale,
    half_scale_bias,
    lo_offset,
    alibi_ptr,
    stride_alibi_b,
    key_offset,
    GROUP: gl.constexpr,
    CAUSAL: gl.constexpr,
    LEFT: gl.constexpr,
    ALIBI: gl.constexpr,
    HEAD_BIAS: gl.constexpr,
    SEQUENCE_BIAS: gl.constexpr,
    VARLEN: gl.constexpr,
    KEY_TAIL: gl.constexpr,
    CONSUMERS: gl.constexpr,
    STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
):
    """One program: 64 x CONSUMERS query rows of head h of batch row b. Descriptors are 4-d (B, S, H, D)
    with blocks [1, rows, 1, D]: keys past Sk load as zeros, outputs past Sq are not written. Query i sees
    key j where j <= i + diag_offset with CAUSAL (a causal diagonal, or a window's right bound folded into
    it) and j >= i + lo_offset with LEFT (a window's left bound). With VARLEN the tensors are packed
    sequences seen as (1, total, H, D), sequence b at tokens cu_seqlens[b] .. cu_seqlens[b + 1] - 1 (its
    diagonal at the bottom right, Sk - Sq added to diag_offset; o_ptr, o_desc's tensor, takes the stores of
    a last partial tile); seqlen_q and seqlen_k are then the longest lengths and unused.
    With ALIBI the logit gains -alibi_ptr[b * stride_alibi_b + h] |i + key_offset - j| (key_offset: the
    diagonal's, without a window's right bound; with VARLEN the sequence's Sk - Sq is added).
    The bias is head_bias_ptr[h] with HEAD_BIAS, else -log of the sequence's key count (0 with no key) with
    SEQUENCE_BIAS (packed sequences), else twice half_scale_bias. KEY_TAIL: the keys of some row end inside a
    tile (always with VARLEN), whose keys past the end are masked."""
    i_m = gl.program_id(0)
    if CAUSAL:  # the longest rows first, so the last wave is made of short ones
        i_m = gl.num_programs(0) - 1 - i_m
    h, b = gl.program_id(1), gl.program_id(2)
    half_slope = 0.0
    if ALIBI:  # (b: the batch row or packed sequence)
        half_slope = 0.5 * gl.load(alibi_ptr + b * stride_alibi_b + h).to(gl.float32)
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = ROWS * CONSUMERS
    m0 = i_m * BLOCK_M
    half_bias = half_scale_bias
    q_start = 0
    k_start = 0
    if VARLEN:
        q_start, seqlen_q, k_start, seqlen_k = sm90.sequence(cu_seqlens_q, cu_seqlens_k, b)
        diag_offset += seqlen_k - seqlen_q
        key_offset += seqlen_k - seqlen_q
        b = 0
        if m0 >= seqlen_q:  # the grid is sized for the longest sequence
            return
        if SEQUENCE_BIAS:
            half_bias = sm90.sequence_half_bias(seqlen_k)
    if HEAD_BIAS:
        half_bias = 0.5 * gl.load(head_bias_ptr + h).to(gl.float32)
    n_tiles, _ = _key_tiles(m0, seqlen_k, diag_offset, BLOCK_M, BLOCK_N, CAUSAL, KEY_TAIL)
    t0 = 0
    if LEFT:
        t0, _ = _window_tiles(m0, lo_offset, n_tiles, BLOCK_M, BLOCK_N)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    slot_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(slot_free.index(i), count=CONSUMERS)  # every consumer group releases a slot

    shared = (o_desc, q_smem, k_bufs, v_bufs, q_ready, k_ready, v_ready, slot_free, b, h, m0, t0, n_tiles, seqlen_q,
              seqlen_k, diag_offset, lo_offset, half_scale, half_bias, half_slope, key_offset, q_start, o_ptr)
    # The second number of a consumer's arguments: which 64 of the program's rows its group owns.
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (shared, 0, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, LEFT, VARLEN, KEY_TAIL, ALIBI)),
            (_consumer, (shared, 1, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, LEFT, VARLEN, KEY_TAIL, ALIBI)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_ready, k_ready, v_ready, slot_free, b, h,
                       h // GROUP, q_start + m0, k_start, t0, n_tiles, CONSUMERS, BLOCK_N, STAGES)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGISTERS])
    elif CONSUMERS == 3:
        gl.warp_specialize([
            (_consumer, (shared, 0, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, LEFT, VARLEN, KEY_TAIL, ALIBI)),
            (_consumer, (shared, 1, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, LEFT, VARLEN, KEY_TAIL, ALIBI)),
            (_consumer, (shared, 2, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, LEFT, VARLEN, KEY_TAIL, ALIBI)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_ready, k_ready, v_ready, slot_free, b, h,
                       h // GROUP, q_start + m0, k_start, t0, n_tiles, CONSUMERS, BLOCK_N, STAGES)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGISTERS])
    else:
        gl.warp_specialize([
            (_consumer, (shared, 0, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, LEFT, VARLEN, KEY_TAIL, ALIBI)),
            (_consumer, (shared, 1, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, LEFT, VARLEN, KEY_TAIL, ALIBI)),
            (_consumer, (shared, 2, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, LEFT, VARLEN, KEY_TAIL, ALIBI)),
            (_consumer, (shared, 3, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, LEFT, VARLEN, KEY_TAIL, ALIBI)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_ready, k_ready, v_ready, slot_free, b, h,
                       h // GROUP, q_start + m0, k_start, t0, n_tiles, CONSUMERS, BLOCK_N, STAGES)),
        ], [4, 4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS, LOADER_REGISTERS])
# fmt: on


def unsupported(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor | None, params: Params, alibi: Tensor | None, rows: Rows
) -> str | None:
    """Why this kernel cannot run a forward (on an sm_90 GPU; ``kernels.py`` checks the device), or None if
    it can: head dim 64 or 128, a diagonal at the bottom right and no window's left bound for packed
    sequences, no dropout, and what ``host.unsupported_common`` asks (any mask: full, causal or a window).
    ``out`` None: a fresh buffer, which TMA can address."""
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]}, not one of {HEAD_DIMS}"
    varlen = rows.cu_seqlens_q is not None
    if varlen and params.mask.top_left:
        return "packed sequences with the causal diagonal at the top left"
    if varlen and params.mask.bounds[0] >= 0:
        # The keys before a sequence's first window are its own, in the tile its first rows read: masked,
        # but a NaN among their values would reach those rows through 0 x NaN (a dense row's descriptors
        # start at the first key some query sees).
        return f"packed sequences with a window's left bound ({params.mask.bounds})"
    if params.dropout is not None:
        return "attention dropout"
    if alibi is not None and varlen and q.shape[-1] == 64:
        # Four consumer groups of 112 registers: ptxas spills 32 bytes (tests/test_hopper.py).
        return "ALiBi on packed sequences at head dim 64"
    return host.unsupported_common(q, k, v, (q, k, v, out))


def forward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, params: Params, bias: Bias, alibi: Tensor | None, rows: Rows
) -> None:
    """Writes the forward into ``out``. Bias: a per-head tensor, a float, or None: -log of each packed
    sequence's key count. ``alibi``: contiguous (H,) or (B, H) slopes, or None."""
    varlen = rows.cu_seqlens_q is not None
    q, k, v, out = host.batch_rows(rows, q, k, v, out)
    seqlen_q, seqlen_k, num_heads, num_kv_heads = rows.seqlen_q, rows.seqlen_k, q.shape[2], k.shape[2]
    group = num_heads // num_kv_heads
    left, right = params.mask.bounds
    causal, window_left = right >= 0, left >= 0  # the kernel's CAUSAL (any right bound) and LEFT
    # A window's programs see as many keys each, as full attention's do: its configuration (at D128 three
    # groups, 6-8% faster than causal's two on windows of 256-4096 keys at 4k and 16k, H100:
    # benchmarks/results/tree_ab_h100_2026-12-07_gluon_windows_consumers.json).
    config = CONFIGS[(q.shape[-1], causal and not window_left)]
    rows_per_group = int(ROWS)
    max_registers, consumer_registers = config.registers
    head_bias = bias if isinstance(bias, Tensor) else None
    sequence_bias = bias is None
    at = host.diagonals(params.mask, seqlen_q, seqlen_k, varlen)  # (packed: no left bound, ``unsupported``)
    key_tail = varlen or at.seqlen_k % config.block_n != 0
    args = (
        host.descriptor(q, rows_per_group),
        host.descriptor(k[:, at.first : at.seen], config.block_n),
        host.descriptor(v[:, at.first : at.seen], config.block_n),
        host.descriptor(out, rows_per_group),
        out,
        head_bias,
        rows.cu_seqlens_q,
        rows.cu_seqlens_k,
        seqlen_q,
        at.seqlen_k,
        at.diag_offset,
        0.5 * params.scale,
        0.5 * bias if isinstance(bias, float) else 0.0,
        at.lo_offset,
        alibi,
        alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0,
        at.key_offset,
        group,
        causal,
        window_left,
        alibi is not None,
        head_bias is not None,
        sequence_bias,
        varlen,
        key_tail,
        config.consumers,
        config.stages,
        consumer_registers,
    )
    key = (
        q.shape[-1],
        config,
        q.dtype,
        k.dtype,
        v.dtype,
        out.dtype,
        group,
        causal,
        window_left,
        None if alibi is None else alibi.dtype,
        sequence_bias,
        varlen,
        key_tail,
        None if head_bias is None else head_bias.dtype,
    )
    grid = (host.cdiv(seqlen_q, rows_per_group * config.consumers), num_heads, rows.batch)
    if grid[0] and rows.batch:
        host.launch(sigmoid_attn_fwd_kernel_sm90, grid, args, key, num_warps=4, maxnreg=max_registers)
