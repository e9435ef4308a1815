"""FlashSigmoid: Triton forward and backward kernels for sigmoid attention.

Top to bottom: tile configs -> jit helpers -> kernels -> launchers -> torch.library ops and autograd.
The algorithm (derivations in README.md): with no row max, row sum or rescaling, the forward is
``acc += sigmoid(z) @ V`` tile by tile and saves nothing but its inputs and output; the backward
recomputes P and uses dS = dP * P * (1 - P). Sigmoid is ``0.5 * tanh(x / 2) + 0.5`` with the hardware
``tanh.approx.f32`` (one special-function op per score) on the GPU, and the exact sigmoid in the CPU
interpreter, which cannot run inline assembly.

Masking: only the causal / sliding-window diagonal tiles apply a mask. Keys past Sk need none: their
V rows (and dO rows for queries past Sq) are loaded as zeros, so they add exactly nothing.
One forward kernel serves three layouts of the batch rows: dense (B, S, H, D) tensors, packed
variable-length sequences (cu_seqlens) and a KV cache (per-row key counts, optionally paged); for the
cache it can pack the query heads of a GQA group into one tile (each K/V tile is read once per group) and
split the keys across programs, whose fp32 partial outputs simply add (README.md says why that is exact).
The backward is two kernels, dK/dV (one program per key tile and kv head, looping over the query heads
of its GQA group, so dK/dV are reduced over the group in registers) and dQ; neither uses atomics, so it is
deterministic.
On Hopper (sm_90) the dense forward at head dims 64 and 128 runs instead on a warp-specialised Gluon kernel
(``hopper.py``), 13-23% faster than the Triton one at D128, and the dense backward at head dims 64 and 128
on one (``hopper_bwd.py``) that adds dQ by TMA reductions, unless the call asks for determinism.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from . import hopper, hopper_bwd, host

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter cannot run inline assembly (no tanh.approx), and its tl.dot is wrong on bfloat16
# operands (Triton 3.6), so there the operands are upcast: they hold bf16-rounded values, so the product
# is the same fp32-accumulated one the GPU computes.
_HW_TANH = tl.constexpr(not INTERPRET)
_UPCAST_DOT = tl.constexpr(INTERPRET)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Tile tables keyed by (padded head dim, has a right window bound, i.e. causal). Entries for head dims 64
# and 128 are the fastest of sweeps on an H100 (bf16, 16k tokens), all in benchmarks/results/:
# tune_tiles_h100_2026-11-24.json and tune_tiles2_h100_2026-11-24.json at seqlen 4096 (8 warps lose 30-40%
# to 4 on 64x64 dQ tiles); tune_tiles3_fwd_h100_2026-11-24.json (highest geometric mean over seqlens 1024,
# 4096 and 16384) for the D128 full forward (128x32 tiles on 8 warps); tune_tiles3_dkdv_h100_2026-11-24.json
# (seqlen 4096) for the dK/dV kernel since it computes transposed score tiles. Against the previous tables,
# interleaved (kernel_ab_h100_2026-11-24.json): D128 full forward +6-9%, backward +3-12%. Head dims 32 and
# 256 are not tuned: 32 reuses 64's tiles, 256 halves them to fit the registers. The interpreter runs on
# the CPU, where small tiles keep tests fast and still cross tile boundaries.
_INTERPRET_CONFIG = TileConfig(16, 16, 1, 1)
FWD_CONFIGS = {
    (64, False): TileConfig(128, 64, 4, 3),
    (64, True): TileConfig(128, 64, 8, 4),
    (128, False): TileConfig(128, 32, 8, 4),
    (128, True): TileConfig(128, 32, 8, 4),
    (256, False): TileConfig(64, 32, 4, 2),
    (256, True): TileConfig(64, 32, 4, 2),
}
BWD_DKDV_CONFIGS = {
    (64, False): TileConfig(64, 64, 4, 2),
    (64, True): TileConfig(64, 64, 4, 3),
    (128, False): TileConfig(64, 128, 8, 3),
    (128, True): TileConfig(64, 128, 8, 3),
    (256, False): TileConfig(32, 64, 4, 1),
    (256, True): TileConfig(32, 64, 4, 1),
}
BWD_DQ_CONFIGS = {
    (64, False): TileConfig(64, 64, 4, 2),
    (64, True): TileConfig(64, 32, 4, 3),
    (128, False): TileConfig(64, 64, 4, 2),
    (128, True): TileConfig(128, 64, 8, 3),
    (256, False): TileConfig(64, 32, 4, 1),
    (256, True): TileConfig(64, 32, 4, 1),
}
# The KV-cache forward (decode, chunked prefill) keyed by padded head dim; block_m is the most query rows
# of a tile (fewer when Sq x group is smaller). D128: the best or within 4% of it on every decode shape
# of benchmarks/results/tune_decode_h100_2026-11-24.json (2.6-3.1 TB/s of K and V on an H100); 64 and
# 256 are not tuned.
KVCACHE_CONFIGS = {
    64: TileConfig(64, 64, 4, 3),
    128: TileConfig(64, 64, 4, 3),
    256: TileConfig(64, 32, 4, 2),
}
# Contiguous caches with at least two programs per SM and no split (large batch): 128-wide key tiles. D128
# on an H100, CUDA-graph replays: 0.999-1.012x cuDNN at B16 Hkv32 and B64 against 0.957-1.002x with
# 64-wide tiles; at about one program per SM (B16 Hkv8, B4 Hkv32) 64-wide tiles stay ahead by 0.3-1.2%
# (benchmarks/results/decode_large_batch_h100_2026-11-25.json).
KVCACHE_MANY_PROGRAMS_CONFIGS = {
    128: TileConfig(64, 128, 4, 3),
}
# ... except for caches of at most KVCACHE_SHORT_KEYS keys: a program then reads 16 or fewer 128-wide tiles, and
# three stages of them (192 KiB) leave room for one program per SM, so filling its pipeline is a large share
# of its time; 64-wide tiles in two stages (64 KiB) fit three. On an H200 (CUDA-graph replays, L2 flushed):
# B64 Hkv8 1k 74.5 us against 79.2, B16 and B64 Hkv32 1k 75.0 and 247.7 against 78.8 and 252.5, B64 Hkv8 2k
# 132.6 against 136.7, 1.005-1.021x cuDNN (benchmarks/results/decode_large_batch_h200_2026-12-03.json); on
# the H100 1k 1.017x against 0.999x, and at 8k (B64 Hkv32) 0.975x against 1.012x.
KVCACHE_SHORT_KEYS = 2048
KVCACHE_SHORT_MANY_PROGRAMS_CONFIGS = {
    128: TileConfig(64, 64, 4, 2),
}
# Paged caches read a page id per key (or per tile when pages are whole tiles): wider tiles amortise it.
# D128, pages of 16-256 in shuffled order: 2.6-3.0 TB/s with 128-wide tiles against 2.3-2.7 with 64-wide
# (contiguous: 2.8-3.1), benchmarks/results/tune_decode_paged_h100_2026-11-24.json.
KVCACHE_PAGED_CONFIGS = {
    64: TileConfig(64, 128, 4, 3),
    128: TileConfig(64, 128, 4, 3),
    256: TileConfig(64, 32, 4, 2),
}

# Elements summed per program by the split sum ([splits, BLOCK] fp32 values): 16 KiB of loads in flight.
SUM_SPLITS_ELEMENTS = 4096


def padded_head_dim(head_dim: int) -> int:
    # At least 32: Triton 3.6's ptxas (CUDA 12.8) crashes on the dK/dV kernel with 16-wide tiles in some
    # specialisations (digits-vit's head dim 16, two stages), so tiles narrower than 32 are never built.
    return max(32, triton.next_power_of_2(head_dim))


def _config(table: dict[tuple[int, bool], TileConfig], block_d: int, causal: bool) -> TileConfig:
    if INTERPRET:
        return _INTERPRET_CONFIG
    return table[(max(64, block_d), causal)]


# ----------------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def _dot(a, b, acc):
    if _UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _sigmoid_of_half(z):
    """sigmoid(2 z): callers fold the 1/2 of 0.5 * tanh(x / 2) + 0.5 into their scale and bias."""
    if _HW_TANH:
        t = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=tl.float32, is_pure=True, pack=1
        )
        return 0.5 * t + 0.5
    else:
        return tl.sigmoid(2.0 * z)


@triton.jit
def _half_logits(s, i, j, half_scale, half_bias, half_slope, diag_offset, ALIBI: tl.constexpr):
    """z = logit / 2 of a tile of raw scores s = q . k, with i the query and j the key index of each element
    (broadcastable: i [BM, 1] and j [1, BN] for a [BM, BN] tile, or transposed); half_bias, half_slope:
    scalars or broadcastable like i."""
    z = s * half_scale + half_bias
    if ALIBI:
        z -= half_slope * tl.abs(i + diag_offset - j).to(tl.float32)
    return z


@triton.jit
def _allowed(i, j, diag_offset, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Window mask of query i, key j (broadcastable as in _half_logits): i + off - left <= j <= i + off + right
    (causal is right = 0), for callers with at least one bound; one comparison per bound."""
    diag = i + diag_offset
    if HAS_LEFT and HAS_RIGHT:
        return (j >= diag - window_left) & (j <= diag + window_right)
    elif HAS_LEFT:
        return j >= diag - window_left
    else:
        return j <= diag + window_right


@triton.jit
def _counted(ok, i, j, diag_offset, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """The pairs of a masked tile that count: ``ok`` (the tile's rows or keys that are in the sequence and
    seen, broadcast) and, with a window bound, ``_allowed``."""
    if HAS_LEFT or HAS_RIGHT:
        return ok & _allowed(i, j, diag_offset, window_left, window_right, HAS_LEFT, HAS_RIGHT)
    else:
        return ok


@triton.jit
def _sees_a_key(i, diag_offset, seqlen_k, window_left, window_right, HAS_LEFT: tl.constexpr,
                HAS_RIGHT: tl.constexpr):
    """Whether query i has an allowed key: [i + off - left, i + off + right] meets [0, Sk). With the roles
    swapped (-off, Sq, right for left and left for right), whether key i is allowed for some query."""
    sees = (i >= 0) & (seqlen_k > 0)
    if HAS_LEFT:
        sees = sees & (i + diag_offset - window_left < seqlen_k)
    if HAS_RIGHT:
        sees = sees & (i + diag_offset + window_right >= 0)
    return sees


@triton.jit
def _visible_keys(m0, rows, diag_offset, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT: tl.constexpr,
                  HAS_RIGHT: tl.constexpr):
    """[lo, hi): the keys that a query of rows m0 .. m0 + rows - 1 (those before Sq) may see. Masked tiles load
    only these: a key no query of the tile sees reads as 0, so a NaN there cannot reach a product."""
    lo = 0
    hi = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(m0 + diag_offset - window_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(tl.minimum(m0 + rows, seqlen_q) - 1 + diag_offset + window_right + 1, seqlen_k)
    return lo, hi


@triton.jit
def _key_tiles(m0, diag_offset, seqlen_k, window_left, window_right,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key-tile bounds for query rows [m0, m0 + BM): tiles in [lo, hi) hold an allowed key; tiles in
    [full_lo, full_hi) hold only allowed keys for every row and lie inside Sk (no mask, no bounds check)."""
    lo = 0
    hi = seqlen_k
    full_lo = 0
    full_hi = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(m0 + diag_offset - window_left, 0)
        full_lo = m0 + BLOCK_M - 1 + diag_offset - window_left
    if HAS_RIGHT:
        hi = tl.minimum(m0 + BLOCK_M + diag_offset + window_right, seqlen_k)
        full_hi = m0 + diag_offset + window_right + 1
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo), hi)
    full_hi = tl.minimum(full_hi, hi)
    full_hi = tl.maximum((full_hi // BLOCK_N) * BLOCK_N, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _split_key_tiles(lo, full_lo, full_hi, hi, split, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """The share of split ``split`` of the key tiles [lo, hi): a run of whole tiles, the three ranges cut
    to it. Full tiles stay full; the others keep their masks."""
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), NUM_SPLITS) * BLOCK_N
        s_lo = tl.minimum(lo + split * per_split, hi)
        s_hi = tl.minimum(s_lo + per_split, hi)
        full_lo = tl.minimum(tl.maximum(full_lo, s_lo), s_hi)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), s_hi)
        lo = s_lo
        hi = s_hi
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_tiles(n0, diag_offset, seqlen_q, window_left, window_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query-tile bounds for key rows [n0, n0 + BN), as ``_key_tiles`` with the roles swapped: tiles in
    [full_lo, full_hi) need no mask and lie inside Sq."""
    lo = 0
    hi = seqlen_q
    full_lo = 0
    full_hi = seqlen_q
    if HAS_RIGHT:  # j <= i + off + right  <=>  i >= j - off - right
        lo = tl.maximum(n0 - diag_offset - window_right, 0)
        full_lo = n0 + BLOCK_N - 1 - diag_offset - window_right
    if HAS_LEFT:  # j >= i + off - left  <=>  i <= j - off + left
        hi = tl.minimum(n0 + BLOCK_N - diag_offset + window_left, seqlen_q)
        full_hi = n0 - diag_offset + window_left + 1
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_M) * BLOCK_M, lo), hi)
    full_hi = tl.minimum(full_hi, hi)
    full_hi = tl.maximum((full_hi // BLOCK_M) * BLOCK_M, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _row_bounds(b, CuSeqlensQ, CuSeqlensK, SeqlensK, seqlen_q, seqlen_k,
                VARLEN: tl.constexpr, KV_LENS: tl.constexpr):
    """(first query token, Sq, first key token, Sk) of batch row b. Dense rows start at 0 with the static
    lengths; packed sequences read their cumulative lengths; a KV-cache row's key count is SeqlensK[b]."""
    q_start = 0
    k_start = 0
    if VARLEN:
        q_start = tl.load(CuSeqlensQ + b)
        seqlen_q = tl.load(CuSeqlensQ + b + 1) - q_start
        k_start = tl.load(CuSeqlensK + b)
        seqlen_k = tl.load(CuSeqlensK + b + 1) - k_start
        q_start = q_start.to(tl.int64)
        k_start = k_start.to(tl.int64)
    if KV_LENS:
        seqlen_k = tl.load(SeqlensK + b)
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _row_half_bias(seqlen_k, half_scale_bias, DEFAULT_BIAS: tl.constexpr):
    """bias / 2 shared by the heads of a row: the constant, or -log(Sk) / 2 of this row (0 with no key)."""
    if DEFAULT_BIAS:
        return tl.where(seqlen_k > 0, -0.5 * tl.log(tl.maximum(seqlen_k, 1).to(tl.float32)), 0.0)
    else:
        return half_scale_bias


@triton.jit
def _head_terms(HeadBias, Alibi, stride_alibi_b, b, h, row_half_bias, ALIBI: tl.constexpr, HEAD_BIAS: tl.constexpr):
    """(bias / 2, slope / 2) of query head h (a scalar, or [BM, 1] heads of packed rows) in batch row b."""
    half_bias = row_half_bias
    if HEAD_BIAS:
        half_bias = 0.5 * tl.load(HeadBias + h).to(tl.float32)
    half_slope = 0.0
    if ALIBI:
        half_slope = 0.5 * tl.load(Alibi + b * stride_alibi_b + h).to(tl.float32)
    return half_bias, half_slope


@triton.jit
def _kv_offsets(n0, offs_n, Pages, stride_kp, stride_kn, stride_vp, stride_vn, seqlen_k,
                BLOCK_N: tl.constexpr, CHECK_ROWS: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Memory offsets [BN] of keys ``offs_n`` = n0 + [0, BN) in K and in V: by position, or through the row's
    page table (one page per tile when pages are whole tiles, else a page per key)."""
    if PAGED:
        if PAGE_SIZE % BLOCK_N == 0:
            page = tl.load(Pages + n0 // PAGE_SIZE).to(tl.int64)
        elif CHECK_ROWS:  # pages past the row's last one may not exist
            page = tl.load(Pages + offs_n // PAGE_SIZE, mask=offs_n < seqlen_k, other=0).to(tl.int64)
        else:
            page = tl.load(Pages + offs_n // PAGE_SIZE).to(tl.int64)
        slot = offs_n % PAGE_SIZE
        return page * stride_kp + slot * stride_kn, page * stride_vp + slot * stride_vn
    else:
        return offs_n * stride_kn, offs_n * stride_vn


@triton.jit
def _load_rows(ptr, row_offsets, rows_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """A [rows, BLOCK_D] tile at ptr + row_offsets; rows where ``rows_ok`` is false (when CHECK_ROWS) and
    columns past HEAD_DIM read as 0, without touching memory."""
    ptrs = ptr + row_offsets[:, None] + offs_d[None, :]
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            return tl.load(ptrs, mask=rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _store_rows(ptr, value, row_offsets, offs_rows, offs_d, n_rows, HEAD_DIM: tl.constexpr):
    ptrs = ptr + row_offsets[:, None] + offs_d[None, :]
    tl.store(ptrs, value, mask=(offs_rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_tiles(acc, q, K, V, KDesc, VDesc, b, h_kv, Pages, stride_kp, stride_kn, stride_vp, stride_vn, offs_m, offs_d,
               lo, hi, seqlen_k, key_lo, key_hi, kv_first, half_scale, half_bias, half_slope, diag_offset,
               window_left, window_right, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ALIBI: tl.constexpr,
               PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, TMA: tl.constexpr):
    """acc += P V over key tiles [lo, hi). MASKED tiles load only the keys [key_lo, key_hi) that a row of the
    tile may see (others read as 0; with TMA, the descriptors start at key kv_first and end where no query
    looks further, so the keys no query sees read as 0), and mask every score but the allowed ones, the keys
    past Sk included: a query with an inf times a zero key row would otherwise give a NaN score."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = (offs_n >= key_lo) & (offs_n < key_hi)
        if TMA:  # keys outside the descriptors (before kv_first: negative coordinates) load as zeros
            k = KDesc.load([b, n0 - kv_first, h_kv, 0]).reshape(BLOCK_N, BLOCK_D)
            v = VDesc.load([b, n0 - kv_first, h_kv, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            k_rows, v_rows = _kv_offsets(n0, offs_n, Pages, stride_kp, stride_kn, stride_vp, stride_vn, seqlen_k,
                                         BLOCK_N, MASKED, PAGED, PAGE_SIZE)
            k = _load_rows(K, k_rows, key_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
            v = _load_rows(V, v_rows, key_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        s = _dot(q, tl.trans(k), None)  # [BM, BN]
        i, j = offs_m[:, None], offs_n[None, :]
        z = _half_logits(s, i, j, half_scale, half_bias, half_slope, diag_offset, ALIBI)
        # The mask goes on z (sigmoid(-inf) = 0), not on P: a select on P is moved past P's conversion to
        # 16 bits, where it costs byte permutes; on z it stays one FSEL per score (D64 causal on sm_90, with
        # _allowed's single comparison: a masked tile's loop 377 -> 298 instructions per warp, 217 unmasked).
        if MASKED:
            z = tl.where(_counted(key_ok[None, :], i, j, diag_offset, window_left, window_right, HAS_LEFT, HAS_RIGHT),
                         z, float("-inf"))
        p = _sigmoid_of_half(z)
        acc = _dot(p.to(v.dtype), v, acc)  # [BM, BD]
    return acc


@triton.jit
def sigmoid_attn_fwd_kernel(
    Q, K, V, Out, HeadBias, Alibi, CuSeqlensQ, CuSeqlensK, SeqlensK, BlockTable, KDesc, VDesc, stride_qb, stride_qm,
    stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_os, stride_ob, stride_om,
    stride_oh, stride_alibi_b, stride_bt, seqlen_q, seqlen_k, window_left, window_right, kv_first, half_scale,
    half_scale_bias, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    TOP_LEFT: tl.constexpr, HEAD_BIAS: tl.constexpr, DEFAULT_BIAS: tl.constexpr, ALIBI: tl.constexpr,
    VARLEN: tl.constexpr, KV_LENS: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, PACK_GQA: tl.constexpr,
    NUM_SPLITS: tl.constexpr, TMA: tl.constexpr,
):
    """One program: BLOCK_Q query positions of one head (or, with PACK_GQA, of all GROUP heads of one kv
    head: BLOCK_M = BLOCK_Q * GROUP rows) of batch row b, against its share of the keys (one of
    NUM_SPLITS; with several, Out is an fp32 buffer of per-split partial sums)."""
    i_q, i_h, b = tl.program_id(0) // NUM_SPLITS, tl.program_id(1), tl.program_id(2)
    split = tl.program_id(0) % NUM_SPLITS
    q_start, seqlen_q, k_start, seqlen_k = _row_bounds(b, CuSeqlensQ, CuSeqlensK, SeqlensK, seqlen_q, seqlen_k,
                                                       VARLEN, KV_LENS)
    m0 = i_q * BLOCK_Q
    # The grid covers the longest sequence: a tile past this one's end has no rows of its own. (A separate
    # `if` on the constexpr, so dense kernels compile without the branch.)
    if VARLEN:  # noqa: SIM102
        if m0 >= seqlen_q:
            return
    b64 = b.to(tl.int64)
    diag_offset = seqlen_k - seqlen_q
    if TOP_LEFT:
        diag_offset = 0
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if PACK_GQA:
        h_kv = i_h
        offs_m = m0 + rows // GROUP  # [BM] query position of each row
        heads = h_kv * GROUP + rows % GROUP  # [BM] query head of each row
        half_bias, half_slope = _head_terms(HeadBias, Alibi, stride_alibi_b, b, heads[:, None],
                                            _row_half_bias(seqlen_k, half_scale_bias, DEFAULT_BIAS), ALIBI, HEAD_BIAS)
    else:
        h_kv = i_h // GROUP
        offs_m = m0 + rows
        heads = i_h
        half_bias, half_slope = _head_terms(HeadBias, Alibi, stride_alibi_b, b, heads,
                                            _row_half_bias(seqlen_k, half_scale_bias, DEFAULT_BIAS), ALIBI, HEAD_BIAS)
    Q += b64 * stride_qb + q_start * stride_qm
    q = _load_rows(Q, offs_m * stride_qm + heads * stride_qh, offs_m < seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    if PAGED:
        K += h_kv * stride_kh
        V += h_kv * stride_vh
        Pages = BlockTable + b64 * stride_bt
    else:
        K += b64 * stride_kb + k_start * stride_kn + h_kv * stride_kh
        V += b64 * stride_vb + k_start * stride_vn + h_kv * stride_vh
        Pages = BlockTable

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_tiles(m0, diag_offset, seqlen_k, window_left, window_right,
                                          BLOCK_Q, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    lo, full_lo, full_hi, hi = _split_key_tiles(lo, full_lo, full_hi, hi, split, BLOCK_N, NUM_SPLITS)
    key_lo, key_hi = _visible_keys(m0, BLOCK_Q, diag_offset, seqlen_q, seqlen_k, window_left, window_right,
                                   HAS_LEFT, HAS_RIGHT)
    acc = _fwd_tiles(acc, q, K, V, KDesc, VDesc, b, h_kv, Pages, stride_kb, stride_kn, stride_vb, stride_vn, offs_m,
                     offs_d, lo, full_lo, seqlen_k, key_lo, key_hi, kv_first, half_scale, half_bias, half_slope,
                     diag_offset, window_left, window_right, HEAD_DIM, BLOCK_N, BLOCK_D, True, HAS_LEFT, HAS_RIGHT,
                     ALIBI, PAGED, PAGE_SIZE, TMA)
    acc = _fwd_tiles(acc, q, K, V, KDesc, VDesc, b, h_kv, Pages, stride_kb, stride_kn, stride_vb, stride_vn, offs_m,
                     offs_d, full_lo, full_hi, seqlen_k, key_lo, key_hi, kv_first, half_scale, half_bias, half_slope,
                     diag_offset, window_left, window_right, HEAD_DIM, BLOCK_N, BLOCK_D, False, HAS_LEFT, HAS_RIGHT,
                     ALIBI, PAGED, PAGE_SIZE, TMA)
    acc = _fwd_tiles(acc, q, K, V, KDesc, VDesc, b, h_kv, Pages, stride_kb, stride_kn, stride_vb, stride_vn, offs_m,
                     offs_d, full_hi, hi, seqlen_k, key_lo, key_hi, kv_first, half_scale, half_bias, half_slope,
                     diag_offset, window_left, window_right, HEAD_DIM, BLOCK_N, BLOCK_D, True, HAS_LEFT, HAS_RIGHT,
                     ALIBI, PAGED, PAGE_SIZE, TMA)
    if HAS_LEFT or HAS_RIGHT:  # a query with no allowed key outputs 0, whatever the values it masks hold
        acc = tl.where(_sees_a_key(offs_m, diag_offset, seqlen_k, window_left, window_right, HAS_LEFT,
                                   HAS_RIGHT)[:, None], acc, 0.0)
    Out += split * stride_os + b64 * stride_ob + q_start * stride_om
    _store_rows(Out, acc.to(Out.dtype.element_ty), offs_m * stride_om + heads * stride_oh, offs_m, offs_d,
                seqlen_q, HEAD_DIM)


@triton.jit
def sigmoid_attn_sum_splits_kernel(Partial, Out, numel, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                                   BLOCK: tl.constexpr):
    """Out = the sum over splits of Partial (NUM_SPLITS, numel): one [splits, BLOCK] load, so every split's
    read is in flight at once (a loop over splits waits on each in turn), then a reduction whose order is
    fixed by the compiled kernel: deterministic."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    splits = tl.arange(0, SPLITS_P2)
    mask = (splits[:, None] < NUM_SPLITS) & (offs[None, :] < numel)
    parts = tl.load(Partial + splits[:, None] * numel + offs[None, :], mask=mask, other=0.0)
    tl.store(Out + offs, tl.sum(parts, axis=0).to(Out.dtype.element_ty), mask=offs < numel)


# ----------------------------------------------------------------------------------------------------
# backward: dK, dV


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, Q, DO, stride_qm, stride_dom, offs_n, offs_d, lo, hi, seqlen_q, key_first, key_last,
                    half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ALIBI: tl.constexpr):
    """dK, dV of the key tile over query tiles [lo, hi). MASKED tiles load only the queries before Sq that see a
    key of the tile's [key_first, key_last] (others read as 0) and mask P and dS to the allowed pairs."""
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows_ok = offs_m < seqlen_q
        if MASKED and HAS_RIGHT:
            rows_ok = rows_ok & (offs_m + diag_offset + window_right >= key_first)
        if MASKED and HAS_LEFT:
            rows_ok = rows_ok & (offs_m + diag_offset - window_left <= key_last)
        q = _load_rows(Q, offs_m * stride_qm, rows_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        do = _load_rows(DO, offs_m * stride_dom, rows_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        # Transposed tiles (keys along rows): P^T and dS^T come out of the score dots in the layout the dV and
        # dK dots read from registers, with no transpose through shared memory.
        i, j = offs_m[None, :], offs_n[:, None]
        st = _dot(k, tl.trans(q), None)  # [BN, BM]
        pt = _sigmoid_of_half(_half_logits(st, i, j, half_scale, half_bias, half_slope, diag_offset, ALIBI))
        dpt = _dot(v, tl.trans(do), None)  # [BN, BM]
        dst = dpt * pt * (1.0 - pt)
        if MASKED:
            # Rows past Sq too: a key row holding an inf times their zero query is a NaN score.
            allowed = _counted(rows_ok[None, :], i, j, diag_offset, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            pt = tl.where(allowed, pt, 0.0)
            dst = tl.where(allowed, dst, 0.0)
        dv = _dot(pt.to(do.dtype), do, dv)  # [BN, BD]
        dk = _dot(dst.to(q.dtype), q, dk)  # [BN, BD]
    return dk, dv


@triton.jit
def sigmoid_attn_bwd_kernel_dkdv(
    Q, K, V, DO, DK, DV, HeadBias, Alibi, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_alibi_b, seqlen_q, seqlen_k, window_left, window_right, scale, half_scale, half_scale_bias,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, TOP_LEFT: tl.constexpr,
    HEAD_BIAS: tl.constexpr, DEFAULT_BIAS: tl.constexpr, ALIBI: tl.constexpr, VARLEN: tl.constexpr,
):
    i_n, h_kv, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k = _row_bounds(b, CuSeqlensQ, CuSeqlensK, CuSeqlensK, seqlen_q, seqlen_k,
                                                       VARLEN, False)
    n0 = i_n * BLOCK_N
    if VARLEN:  # noqa: SIM102
        if n0 >= seqlen_k:
            return
    b64 = b.to(tl.int64)
    diag_offset = seqlen_k - seqlen_q
    if TOP_LEFT:
        diag_offset = 0
    row_half_bias = _row_half_bias(seqlen_k, half_scale_bias, DEFAULT_BIAS)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b64 * stride_kb + k_start * stride_kn + h_kv * stride_kh, offs_n * stride_kn,
                   offs_n < seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + b64 * stride_vb + k_start * stride_vn + h_kv * stride_vh, offs_n * stride_vn,
                   offs_n < seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    key_last = tl.minimum(n0 + BLOCK_N, seqlen_k) - 1
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_tiles(n0, diag_offset, seqlen_q, window_left, window_right,
                                            BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for g in range(GROUP):
        h = h_kv * GROUP + g
        Qh = Q + b64 * stride_qb + q_start * stride_qm + h * stride_qh
        DOh = DO + b64 * stride_dob + q_start * stride_dom + h * stride_doh
        half_bias, half_slope = _head_terms(HeadBias, Alibi, stride_alibi_b, b, h, row_half_bias, ALIBI, HEAD_BIAS)
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, stride_qm, stride_dom, offs_n, offs_d, lo, full_lo, seqlen_q,
                                 n0, key_last, half_scale, half_bias, half_slope, diag_offset, window_left,
                                 window_right, HEAD_DIM, BLOCK_M, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, ALIBI)
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, stride_qm, stride_dom, offs_n, offs_d, full_lo, full_hi,
                                 seqlen_q, n0, key_last, half_scale, half_bias, half_slope, diag_offset, window_left,
                                 window_right, HEAD_DIM, BLOCK_M, BLOCK_D, False, HAS_LEFT, HAS_RIGHT, ALIBI)
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, stride_qm, stride_dom, offs_n, offs_d, full_hi, hi, seqlen_q,
                                 n0, key_last, half_scale, half_bias, half_slope, diag_offset, window_left,
                                 window_right, HEAD_DIM, BLOCK_M, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, ALIBI)
    if HAS_LEFT or HAS_RIGHT:  # a key no query may see gets exactly 0, whatever the rows that mask it hold
        seen = _sees_a_key(offs_n, -diag_offset, seqlen_q, window_right, window_left, HAS_RIGHT, HAS_LEFT)
        dk = tl.where(seen[:, None], dk, 0.0)
        dv = tl.where(seen[:, None], dv, 0.0)
    _store_rows(DK + b64 * stride_dkb + k_start * stride_dkn + h_kv * stride_dkh, (dk * scale).to(DK.dtype.element_ty),
                offs_n * stride_dkn, offs_n, offs_d, seqlen_k, HEAD_DIM)
    _store_rows(DV + b64 * stride_dvb + k_start * stride_dvn + h_kv * stride_dvh, dv.to(DV.dtype.element_ty),
                offs_n * stride_dvn, offs_n, offs_d, seqlen_k, HEAD_DIM)


# ----------------------------------------------------------------------------------------------------
# backward: dQ (and the per-head bias gradient, as per-tile partial sums)


@triton.jit
def _bwd_dq_tiles(dq, dsum, q, do, K, V, stride_kn, stride_vn, offs_m, offs_d, lo, hi, key_lo, key_hi,
                  half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ALIBI: tl.constexpr,
                  HEAD_BIAS: tl.constexpr):
    """dQ of the query tile over key tiles [lo, hi); MASKED tiles as in ``_fwd_tiles``, with dS masked too."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = (offs_n >= key_lo) & (offs_n < key_hi)
        k = _load_rows(K, offs_n * stride_kn, key_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_rows(V, offs_n * stride_vn, key_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        s = _dot(q, tl.trans(k), None)  # [BM, BN]
        i, j = offs_m[:, None], offs_n[None, :]
        p = _sigmoid_of_half(_half_logits(s, i, j, half_scale, half_bias, half_slope, diag_offset, ALIBI))
        dp = _dot(do, tl.trans(v), None)  # [BM, BN]
        ds = dp * p * (1.0 - p)
        if MASKED:
            ds = tl.where(_counted(key_ok[None, :], i, j, diag_offset, window_left, window_right, HAS_LEFT,
                                   HAS_RIGHT), ds, 0.0)
        dq = _dot(ds.to(k.dtype), k, dq)  # [BM, BD]
        if HEAD_BIAS:
            dsum += tl.sum(ds, axis=1)
    return dq, dsum


@triton.jit
def sigmoid_attn_bwd_kernel_dq(
    Q, K, V, DO, DQ, DBiasPartial, HeadBias, Alibi, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh, stride_alibi_b,
    seqlen_q, seqlen_k, window_left, window_right, scale, half_scale, half_scale_bias,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, TOP_LEFT: tl.constexpr,
    HEAD_BIAS: tl.constexpr, DEFAULT_BIAS: tl.constexpr, ALIBI: tl.constexpr, VARLEN: tl.constexpr,
):
    i_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k = _row_bounds(b, CuSeqlensQ, CuSeqlensK, CuSeqlensK, seqlen_q, seqlen_k,
                                                       VARLEN, False)
    m0 = i_m * BLOCK_M
    if VARLEN:  # noqa: SIM102 (its bias partial stays at the buffer's 0)
        if m0 >= seqlen_q:
            return
    b64 = b.to(tl.int64)
    diag_offset = seqlen_k - seqlen_q
    if TOP_LEFT:
        diag_offset = 0
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    K += b64 * stride_kb + k_start * stride_kn + (h // GROUP) * stride_kh
    V += b64 * stride_vb + k_start * stride_vn + (h // GROUP) * stride_vh
    half_bias, half_slope = _head_terms(HeadBias, Alibi, stride_alibi_b, b, h,
                                        _row_half_bias(seqlen_k, half_scale_bias, DEFAULT_BIAS), ALIBI, HEAD_BIAS)
    q = _load_rows(Q + b64 * stride_qb + q_start * stride_qm + h * stride_qh, offs_m * stride_qm, offs_m < seqlen_q,
                   offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b64 * stride_dob + q_start * stride_dom + h * stride_doh, offs_m * stride_dom,
                    offs_m < seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_tiles(m0, diag_offset, seqlen_k, window_left, window_right,
                                          BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    key_lo, key_hi = _visible_keys(m0, BLOCK_M, diag_offset, seqlen_q, seqlen_k, window_left, window_right,
                                   HAS_LEFT, HAS_RIGHT)
    dq, dsum = _bwd_dq_tiles(dq, dsum, q, do, K, V, stride_kn, stride_vn, offs_m, offs_d, lo, full_lo, key_lo, key_hi,
                             half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                             HEAD_DIM, BLOCK_N, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, ALIBI, HEAD_BIAS)
    dq, dsum = _bwd_dq_tiles(dq, dsum, q, do, K, V, stride_kn, stride_vn, offs_m, offs_d, full_lo, full_hi, key_lo,
                             key_hi, half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                             HEAD_DIM, BLOCK_N, BLOCK_D, False, HAS_LEFT, HAS_RIGHT, ALIBI, HEAD_BIAS)
    dq, dsum = _bwd_dq_tiles(dq, dsum, q, do, K, V, stride_kn, stride_vn, offs_m, offs_d, full_hi, hi, key_lo, key_hi,
                             half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                             HEAD_DIM, BLOCK_N, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, ALIBI, HEAD_BIAS)
    if HAS_LEFT or HAS_RIGHT:  # a query with no allowed key gets exactly 0, whatever the keys it masks hold
        dq = tl.where(_sees_a_key(offs_m, diag_offset, seqlen_k, window_left, window_right, HAS_LEFT,
                                  HAS_RIGHT)[:, None], dq, 0.0)
    _store_rows(DQ + b64 * stride_dqb + q_start * stride_dqm + h * stride_dqh, (dq * scale).to(DQ.dtype.element_ty),
                offs_m * stride_dqm, offs_m, offs_d, seqlen_q, HEAD_DIM)
    if HEAD_BIAS:
        # One partial sum per (b, h, query tile), reduced on the host in a fixed order: deterministic.
        n_tiles = tl.num_programs(0)
        # Rows past Sq (zero queries and dO) score NaN against a key row holding an inf: left out.
        dsum = tl.where(offs_m < seqlen_q, dsum, 0.0)
        tl.store(DBiasPartial + (b * tl.num_programs(1) + h) * n_tiles + i_m, tl.sum(dsum, axis=0))


# ----------------------------------------------------------------------------------------------------
# launchers: callable without autograd


@dataclass(frozen=True)
class FlashParams:
    """The non-tensor options of one call. Window bounds of -1 are unbounded; causal is right = 0.
    ``default_bias``: the bias is -log(Sk) of each batch row (each sequence, each cache row) instead of
    ``const_bias``; neither is used when a per-head bias tensor is given. ``deterministic``: the backward
    must be bit-identical across runs (as it is whenever torch.use_deterministic_algorithms is on)."""

    scale: float
    const_bias: float
    default_bias: bool
    window_left: int
    window_right: int
    top_left: bool
    deterministic: bool = False


@dataclass(frozen=True)
class Rows:
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

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dense(t: Tensor | None) -> Tensor | None:
    """The kernels index the small tensors (a per-head bias, ALiBi slopes, cu_seqlens, cache lengths, block
    tables) as dense row-major arrays: a strided or expanded view is copied here, once per call."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _strides(t: Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; a packed (total, H, D) tensor has no batch dimension."""
    return (0, t.stride(0), t.stride(1)) if packed else tuple(t.stride()[:3])


def _flags(q: Tensor, k: Tensor, params: FlashParams, head_bias: Tensor | None, alibi: Tensor | None, rows: Rows):
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    return dict(
        GROUP=num_heads // k.shape[-2],
        HEAD_DIM=head_dim,
        BLOCK_D=padded_head_dim(head_dim),
        HAS_LEFT=params.window_left >= 0,
        HAS_RIGHT=params.window_right >= 0,
        TOP_LEFT=params.top_left,
        HEAD_BIAS=head_bias is not None,
        DEFAULT_BIAS=params.default_bias and head_bias is None,
        ALIBI=alibi is not None,
        VARLEN=rows.varlen,
    )


def _scalars(params: FlashParams, alibi: Tensor | None) -> dict:
    """The runtime scalars every kernel takes. (Absent tensors are passed as None: Triton compiles them as
    constants, and the flags keep the kernels from touching them.)"""
    return dict(
        alibi_stride=alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0,
        window=(max(params.window_left, 0), max(params.window_right, 0)),
    )


# TMA (Hopper's tensor memory accelerator) loads the forward's K/V tiles of dense rows (_kv_descriptors):
# 0-5% faster than pointer loads at D128 (causal 4k 486 -> 505 TFLOP/s), mixed at D64 on an H100
# (benchmarks/results/tma_forward_h100_2026-11-24.json, whose script turns this off to compare). Only from
# TMA_MIN_KEYS keys on: encoding the two descriptors costs tens of microseconds of host time per call,
# more than the 0-3% it saves at 1k keys (same file), and shorter rows are bound by the host.
USE_TMA = True
TMA_MIN_KEYS = 1024


@functools.lru_cache
def _has_tma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _kv_descriptors(
    k: Tensor, v: Tensor, rows: Rows, params: FlashParams, block_n: int, block_d: int
) -> tuple[TensorDescriptor, TensorDescriptor, int] | None:
    """TMA descriptors of K and V, block [1, BLOCK_N, 1, D], and the key they start at, when the tiles can be
    loaded that way and it pays: dense rows (the descriptors cover the keys some query sees, ``host.visible_keys``,
    so keys before and after them load as zeros; a cache or packed sequences end elsewhere) of at least
    TMA_MIN_KEYS keys, an unpadded head dim (a padded tile would read the next head), 16-byte aligned base and
    strides, and a GPU that has TMA (sm_90+) or the interpreter."""
    if not USE_TMA or rows.varlen or rows.seqlens_k is not None or rows.block_table is not None:
        return None
    if rows.seqlen_k < TMA_MIN_KEYS or k.shape[-1] != block_d or not (INTERPRET or _has_tma(k.device)):
        return None
    tensors = (k, v)
    if not all(host.tma_addressable(t) for t in tensors):
        return None
    diag_offset = 0 if params.top_left else rows.seqlen_k - rows.seqlen_q
    window = (params.window_left, params.window_right)
    first, last = host.visible_keys(rows.seqlen_q, rows.seqlen_k, diag_offset, window)
    if last == first:  # no query sees a key: nothing worth a descriptor
        return None
    views = (t[:, first:last] for t in tensors)
    return (*(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, block_n, 1, block_d]) for t in views), first)


def _launch_fwd(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, params: FlashParams, head_bias: Tensor | None,
    alibi: Tensor | None, rows: Rows, cfg: TileConfig, *, pack_gqa: bool = False, num_splits: int = 1,
    use_tma: bool = True,
) -> None:  # fmt: skip
    """``out`` is shaped like q, or with num_splits > 1 an fp32 (num_splits, *q.shape) buffer of partial sums.
    ``use_tma``: K/V tiles through TMA descriptors where ``_kv_descriptors`` allows them."""
    flags = _flags(q, k, params, head_bias, alibi, rows)
    group = flags["GROUP"]
    block_q = cfg.block_m // group if pack_gqa else cfg.block_m
    num_heads = q.shape[-2]
    grid = (host.cdiv(rows.seqlen_q, block_q) * num_splits, num_heads // group if pack_gqa else num_heads, rows.batch)
    s = _scalars(params, alibi)
    out_rows = out[0] if num_splits > 1 else out
    paged = rows.block_table is not None
    descriptors = _kv_descriptors(k, v, rows, params, cfg.block_n, flags["BLOCK_D"]) if use_tma else None
    k_desc, v_desc, kv_first = descriptors or (k, v, 0)
    sigmoid_attn_fwd_kernel[grid](
        q, k, v, out, head_bias, alibi, rows.cu_seqlens_q, rows.cu_seqlens_k, rows.seqlens_k, rows.block_table,
        k_desc, v_desc,
        *_strides(q, rows.varlen), *_strides(k, rows.varlen), *_strides(v, rows.varlen),
        out.stride(0) if num_splits > 1 else 0, *_strides(out_rows, rows.varlen), s["alibi_stride"],
        rows.block_table.stride(0) if paged else 0,
        rows.seqlen_q, rows.seqlen_k, *s["window"], kv_first, 0.5 * params.scale, 0.5 * params.const_bias,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_Q=block_q, KV_LENS=rows.seqlens_k is not None, PAGED=paged,
        PAGE_SIZE=k.shape[1] if paged else 1, PACK_GQA=pack_gqa, NUM_SPLITS=num_splits, TMA=descriptors is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )  # fmt: skip


def _launch_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, params: FlashParams, head_bias: Tensor | None,
    alibi: Tensor | None, rows: Rows, grads: tuple[Tensor, Tensor, Tensor],
) -> Tensor | None:  # fmt: skip
    """Writes (dq, dk, dv) into ``grads``; returns the bias gradient (or None)."""
    dq, dk, dv = grads
    flags = _flags(q, k, params, head_bias, alibi, rows)
    s = _scalars(params, alibi)
    cu = (rows.cu_seqlens_q, rows.cu_seqlens_k)
    num_heads, num_kv_heads = q.shape[-2], k.shape[-2]
    packed = rows.varlen
    common = (rows.seqlen_q, rows.seqlen_k, *s["window"], params.scale, 0.5 * params.scale, 0.5 * params.const_bias)

    cfg = _config(BWD_DKDV_CONFIGS, flags["BLOCK_D"], flags["HAS_RIGHT"])
    sigmoid_attn_bwd_kernel_dkdv[(host.cdiv(rows.seqlen_k, cfg.block_n), num_kv_heads, rows.batch)](
        q, k, v, do, dk, dv, head_bias, alibi, *cu,
        *_strides(q, packed), *_strides(k, packed), *_strides(v, packed), *_strides(do, packed),
        *_strides(dk, packed), *_strides(dv, packed), s["alibi_stride"], *common,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )  # fmt: skip

    cfg = _config(BWD_DQ_CONFIGS, flags["BLOCK_D"], flags["HAS_RIGHT"])
    n_tiles = host.cdiv(rows.seqlen_q, cfg.block_m)
    partial = None
    if head_bias is not None:  # zeros: tiles past a packed sequence's end write nothing
        partial = torch.zeros(rows.batch, num_heads, n_tiles, dtype=torch.float32, device=q.device)
    sigmoid_attn_bwd_kernel_dq[(n_tiles, num_heads, rows.batch)](
        q, k, v, do, dq, partial, head_bias, alibi, *cu,
        *_strides(q, packed), *_strides(k, packed), *_strides(v, packed), *_strides(do, packed),
        *_strides(dq, packed), s["alibi_stride"], *common,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )  # fmt: skip
    return partial.sum(dim=(0, 2)).to(head_bias.dtype) if partial is not None else None


def _empty_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _as_batch_row(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Packed (total, H, D) tensors as the one-row (1, total, H, D) tensors of the Gluon kernels."""
    return tuple(t.unsqueeze(0) for t in tensors)


def forward_on_sm90(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, params: FlashParams, alibi: Tensor | None, varlen: bool = False
) -> bool:
    """Whether ``flash_fwd`` (``flash_varlen_fwd`` with ``varlen``) runs this forward on the Gluon kernel of
    ``hopper.py``. (It takes packed sequences with their causal diagonal at the bottom right only.)"""
    window = (params.window_left, params.window_right)
    if INTERPRET or (varlen and params.top_left):
        return False
    if varlen:
        q, k, v, out = _as_batch_row(q, k, v, out)
    return hopper.runs_on_sm90(q, k, v, out, window, alibi)


def backward_on_sm90(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, grads: tuple[Tensor, Tensor, Tensor], params: FlashParams,
    head_bias: Tensor | None, alibi: Tensor | None, max_seqlens: tuple[int, int] | None = None,
) -> bool:  # fmt: skip
    """Whether ``flash_bwd`` (``flash_varlen_bwd`` with ``max_seqlens``, the longest query and key lengths)
    runs this backward on the Gluon kernel of ``hopper_bwd.py``."""
    window = (params.window_left, params.window_right)
    deterministic = params.deterministic or torch.are_deterministic_algorithms_enabled()
    if INTERPRET or (max_seqlens is not None and params.top_left):
        return False
    if max_seqlens is not None:
        do, q, k, v, *grads = _as_batch_row(do, q, k, v, *grads)
    return hopper_bwd.runs_on_sm90(q, k, v, do, grads, window, alibi, head_bias, deterministic, max_seqlens)


def flash_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: FlashParams,
    head_bias: Tensor | None = None,
    alibi: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Forward of dense sigmoid attention. q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D), any strides.
    ``out`` (shape of q, last dim contiguous) receives the result when given (tests poison it)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    head_bias, alibi = _dense(head_bias), _dense(alibi)
    out = _empty_like(q) if out is None else out
    if out.numel() == 0:
        return out
    if forward_on_sm90(q, k, v, out, params, alibi):
        hopper.flash_fwd_sm90(
            q, k, v, out, scale=params.scale, const_bias=params.const_bias, default_bias=params.default_bias,
            causal=params.window_right == 0, top_left=params.top_left, head_bias=head_bias,
        )  # fmt: skip
        return out
    batch, seqlen_q, _, head_dim = q.shape
    cfg = _config(FWD_CONFIGS, padded_head_dim(head_dim), params.window_right >= 0)
    _launch_fwd(q, k, v, out, params, head_bias, alibi, Rows(batch, seqlen_q, k.shape[1]), cfg)
    return out


def flash_varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    params: FlashParams,
    head_bias: Tensor | None = None,
    alibi: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Forward over packed sequences: q (total_q, Hq, D), k and v (total_k, Hkv, D), int32 cumulative
    lengths; the max lengths only size the grid (nothing reads the lengths on the host)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    cu_seqlens_q, cu_seqlens_k, head_bias, alibi = (_dense(t) for t in (cu_seqlens_q, cu_seqlens_k, head_bias, alibi))
    out = _empty_like(q) if out is None else out
    if out.numel() == 0:
        return out
    if forward_on_sm90(q, k, v, out, params, alibi, varlen=True):
        hopper.flash_fwd_sm90(
            *_as_batch_row(q, k, v, out), scale=params.scale, const_bias=params.const_bias,
            default_bias=params.default_bias, causal=params.window_right == 0, top_left=False, head_bias=head_bias,
            cu_seqlens=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
        )  # fmt: skip
        return out
    rows = Rows(cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k)
    cfg = _config(FWD_CONFIGS, padded_head_dim(q.shape[-1]), params.window_right >= 0)
    _launch_fwd(q, k, v, out, params, head_bias, alibi, rows, cfg)
    return out


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def kvcache_plan(
    batch: int, seqlen_q: int, num_heads: int, num_kv_heads: int, head_dim: int, capacity: int, device: torch.device,
    paged: bool = False,
) -> tuple[TileConfig, bool, int]:  # fmt: skip
    """(tiles, pack the GQA group into one tile, number of key splits) for a KV-cache forward.

    Packing puts the query heads that share a kv head into the rows of one tile (power-of-two groups that
    fit), so each K/V tile is read once per group. Splits give a small batch about one program per SM
    (the best of 1-128 splits on an H100 in benchmarks/results/tune_decode_h100_2026-11-24.json; more only
    add partial sums), each with at least 4 key tiles; a power of two, so few variants compile. With two
    or more programs per SM and no split, KVCACHE_MANY_PROGRAMS_CONFIGS' wider tiles (for caches of up to
    KVCACHE_SHORT_KEYS, KVCACHE_SHORT_MANY_PROGRAMS_CONFIGS' shallower ring)."""
    group = num_heads // num_kv_heads
    table = KVCACHE_PAGED_CONFIGS if paged else KVCACHE_CONFIGS
    block_d = max(64, padded_head_dim(head_dim))
    base = _INTERPRET_CONFIG if INTERPRET else table[block_d]
    pack = group > 1 and group & (group - 1) == 0 and group <= base.block_m
    rows = seqlen_q * (group if pack else 1)
    block_m = min(base.block_m, max(16, triton.next_power_of_2(rows)))
    tiles_q = host.cdiv(seqlen_q, block_m // group if pack else block_m)
    programs = tiles_q * batch * (num_kv_heads if pack else num_heads)
    if not (INTERPRET or paged) and programs >= 2 * _sm_count(device) and block_d in KVCACHE_MANY_PROGRAMS_CONFIGS:
        short = capacity <= KVCACHE_SHORT_KEYS
        base = (KVCACHE_SHORT_MANY_PROGRAMS_CONFIGS if short else KVCACHE_MANY_PROGRAMS_CONFIGS)[block_d]
    cfg = TileConfig(block_m, base.block_n, base.num_warps, base.num_stages)
    want = max(1, _sm_count(device) // programs)
    most = max(1, host.cdiv(capacity, cfg.block_n) // 4)
    splits = min(want, most, 128)
    return cfg, pack, 1 << (splits.bit_length() - 1)


def flash_kvcache_fwd(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor | None,
    params: FlashParams,
    head_bias: Tensor | None = None,
    alibi: Tensor | None = None,
    block_table: Tensor | None = None,
    out: Tensor | None = None,
    num_splits: int | None = None,
    pack_gqa: bool | None = None,
) -> Tensor:
    """Forward against a KV cache: q (B, Sq, Hq, D) attends to the first seqlens_k[b] (int32, read on the
    device: CUDA graphs may replay this as the cache grows; None: the whole cache) keys of row b of
    k_cache/v_cache, (B, capacity, Hkv, D), or paged (num_blocks, page_size, Hkv, D) through block_table
    (B, max_blocks). ``num_splits``/``pack_gqa`` override ``kvcache_plan`` (tests force each path)."""
    q, k_cache, v_cache = (_last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    seqlens_k, block_table, head_bias, alibi = (_dense(t) for t in (seqlens_k, block_table, head_bias, alibi))
    out = _empty_like(q) if out is None else out
    if out.numel() == 0:
        return out
    batch, seqlen_q, num_heads, head_dim = q.shape
    capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    cfg, pack, splits = kvcache_plan(
        batch, seqlen_q, num_heads, k_cache.shape[2], head_dim, capacity, q.device, paged=block_table is not None
    )
    pack = pack if pack_gqa is None else pack_gqa
    splits = splits if num_splits is None else num_splits
    rows = Rows(batch, seqlen_q, capacity, seqlens_k=seqlens_k, block_table=block_table)
    # No TMA: on a full cache (the only kind it could load) it measured -1.7% to +1% on an H100
    # (benchmarks/results/decode_large_batch_h100_2026-11-25.json).
    launch = functools.partial(_launch_fwd, q, k_cache, v_cache, params=params, head_bias=head_bias, alibi=alibi,
                               rows=rows, cfg=cfg, pack_gqa=pack, use_tma=False)  # fmt: skip
    if splits == 1:
        launch(out=out)
        return out
    # The splits' partial outputs add exactly (no normalisation): a fixed-order fp32 sum, deterministic. A
    # second kernel sums them: the last split program to finish could, but its arrival counts need zeroing
    # every call, and that memset cost what this launch does (1-5% slower at B1-4 on an H200,
    # benchmarks/results/decode_split_sum_ab_h200_2026-12-03.json).
    partial = torch.empty(splits, *q.shape, dtype=torch.float32, device=q.device)
    launch(out=partial, num_splits=splits)
    if not out.is_contiguous():
        return out.copy_(partial.sum(dim=0))
    sum_splits(partial, out)
    return out


def sum_splits(partial: Tensor, out: Tensor) -> None:
    """out (contiguous) = the sum over dim 0 of ``partial`` (splits, *out.shape) fp32, by
    ``sigmoid_attn_sum_splits_kernel``."""
    splits = partial.shape[0]
    splits_p2 = triton.next_power_of_2(splits)
    block = max(32, SUM_SPLITS_ELEMENTS // splits_p2)
    sigmoid_attn_sum_splits_kernel[(host.cdiv(out.numel(), block),)](
        partial, out, out.numel(), NUM_SPLITS=splits, SPLITS_P2=splits_p2, BLOCK=block
    )


def _backward_into(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, params: FlashParams, head_bias: Tensor | None,
    alibi: Tensor | None, rows: Rows, grads: tuple[Tensor, Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    q, k, v, do = (_last_dim_contiguous(t) for t in (q, k, v, do))
    head_bias, alibi = _dense(head_bias), _dense(alibi)
    grads = tuple(_empty_like(t) for t in (q, k, v)) if grads is None else grads
    if q.numel() == 0 or k.numel() == 0:
        for grad in grads:
            grad.zero_()
        return (*grads, torch.zeros_like(head_bias) if head_bias is not None else None)
    max_seqlens = (rows.seqlen_q, rows.seqlen_k) if rows.varlen else None
    if backward_on_sm90(do, q, k, v, grads, params, head_bias, alibi, max_seqlens):
        tensors, cu_seqlens = (do, q, k, v, *grads), None
        if rows.varlen:
            tensors, cu_seqlens = _as_batch_row(*tensors), (rows.cu_seqlens_q, rows.cu_seqlens_k, *max_seqlens)
        dbias = hopper_bwd.flash_bwd_sm90(
            *tensors[:4], tensors[4:], scale=params.scale, const_bias=params.const_bias,
            default_bias=params.default_bias, causal=params.window_right == 0, top_left=params.top_left,
            head_bias=head_bias, cu_seqlens=cu_seqlens,
        )  # fmt: skip
        return (*grads, dbias)
    dbias = _launch_bwd(do, q, k, v, params, head_bias, alibi, rows, grads)
    return (*grads, dbias)


def flash_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: FlashParams,
    head_bias: Tensor | None = None,
    alibi: Tensor | None = None,
    grads: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Backward of ``flash_fwd``: (dq, dk, dv, dbias or None). On sm_90 the calls ``hopper_bwd`` supports add
    dQ atomically unless ``params.deterministic`` (or torch.use_deterministic_algorithms); the Triton kernels
    use no atomics. ``grads`` = (dq, dk, dv) buffers receive the results when given (tests poison them)."""
    rows = Rows(q.shape[0], q.shape[1], k.shape[1])
    return _backward_into(do, q, k, v, params, head_bias, alibi, rows, grads)


def flash_varlen_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    params: FlashParams,
    head_bias: Tensor | None = None,
    alibi: Tensor | None = None,
    grads: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Backward of ``flash_varlen_fwd``, deterministic like ``flash_bwd``."""
    rows = Rows(cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, _dense(cu_seqlens_q), _dense(cu_seqlens_k))
    return _backward_into(do, q, k, v, params, head_bias, alibi, rows, grads)


# ----------------------------------------------------------------------------------------------------
# torch.library ops (so torch.compile traces them as opaque nodes) and autograd
# Each op takes the options as (scale, const_bias, default_bias, window_left, window_right, top_left,
# deterministic).


def _params(scale, const_bias, default_bias, window_left, window_right, top_left, deterministic) -> FlashParams:
    return FlashParams(
        float(scale), float(const_bias), bool(default_bias), int(window_left), int(window_right), bool(top_left),
        bool(deterministic),
    )  # fmt: skip


def _no_bias_grad(q: Tensor) -> Tensor:
    # custom ops cannot return None: an empty tensor stands for "no bias gradient".
    return q.new_empty(0, dtype=torch.float32)


def _fake_grads(q: Tensor, k: Tensor, v: Tensor, head_bias: Tensor | None) -> tuple[Tensor, ...]:
    dbias = torch.empty_like(head_bias) if head_bias is not None else _no_bias_grad(q)
    return (*(_empty_like(t) for t in (q, k, v)), dbias)


@torch.library.custom_op("sigattn::flash_fwd", mutates_args=())
def _flash_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, head_bias: Tensor | None, alibi: Tensor | None,
    scale: float, const_bias: float, default_bias: bool, window_left: int, window_right: int, top_left: bool,
    deterministic: bool,
) -> Tensor:  # fmt: skip
    params = _params(scale, const_bias, default_bias, window_left, window_right, top_left, deterministic)
    return flash_fwd(q, k, v, params, head_bias, alibi)


@_flash_fwd_op.register_fake
def _(q, k, v, head_bias, alibi, *options):
    return _empty_like(q)


@torch.library.custom_op("sigattn::flash_bwd", mutates_args=())
def _flash_bwd_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, head_bias: Tensor | None, alibi: Tensor | None,
    scale: float, const_bias: float, default_bias: bool, window_left: int, window_right: int, top_left: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    params = _params(scale, const_bias, default_bias, window_left, window_right, top_left, deterministic)
    dq, dk, dv, dbias = flash_bwd(do, q, k, v, params, head_bias, alibi)
    return dq, dk, dv, dbias if dbias is not None else _no_bias_grad(q)


@_flash_bwd_op.register_fake
def _(do, q, k, v, head_bias, alibi, *options):
    return _fake_grads(q, k, v, head_bias)


def _setup_dense(ctx, inputs, output):
    q, k, v, head_bias, alibi, *options = inputs
    ctx.save_for_backward(q, k, v, head_bias, alibi)
    ctx.options = options


def _backward_dense(ctx, grad_out):
    q, k, v, head_bias, alibi = ctx.saved_tensors
    dq, dk, dv, dbias = _flash_bwd_op(grad_out, q, k, v, head_bias, alibi, *ctx.options)
    return dq, dk, dv, (dbias if head_bias is not None else None), None, *([None] * len(ctx.options))


_flash_fwd_op.register_autograd(_backward_dense, setup_context=_setup_dense)


@torch.library.custom_op("sigattn::flash_varlen_fwd", mutates_args=())
def _flash_varlen_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, head_bias: Tensor | None, alibi: Tensor | None,
    scale: float, const_bias: float, default_bias: bool, window_left: int, window_right: int, top_left: bool,
    deterministic: bool,
) -> Tensor:  # fmt: skip
    params = _params(scale, const_bias, default_bias, window_left, window_right, top_left, deterministic)
    return flash_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, params, head_bias, alibi)


@_flash_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, head_bias, alibi, *options):
    return _empty_like(q)


@torch.library.custom_op("sigattn::flash_varlen_bwd", mutates_args=())
def _flash_varlen_bwd_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, head_bias: Tensor | None, alibi: Tensor | None,
    scale: float, const_bias: float, default_bias: bool, window_left: int, window_right: int, top_left: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    params = _params(scale, const_bias, default_bias, window_left, window_right, top_left, deterministic)
    dq, dk, dv, dbias = flash_varlen_bwd(
        do, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, params, head_bias, alibi
    )
    return dq, dk, dv, dbias if dbias is not None else _no_bias_grad(q)


@_flash_varlen_bwd_op.register_fake
def _(do, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, head_bias, alibi, *options):
    return _fake_grads(q, k, v, head_bias)


def _setup_varlen(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, head_bias, alibi, *options = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, head_bias, alibi)
    ctx.max_seqlens = (max_q, max_k)
    ctx.options = options


def _backward_varlen(ctx, grad_out):
    q, k, v, cu_q, cu_k, head_bias, alibi = ctx.saved_tensors
    dq, dk, dv, dbias = _flash_varlen_bwd_op(
        grad_out, q, k, v, cu_q, cu_k, *ctx.max_seqlens, head_bias, alibi, *ctx.options
    )
    dbias = dbias if head_bias is not None else None
    return dq, dk, dv, None, None, None, None, dbias, None, *([None] * len(ctx.options))


_flash_varlen_fwd_op.register_autograd(_backward_varlen, setup_context=_setup_varlen)


@torch.library.custom_op("sigattn::flash_kvcache_fwd", mutates_args=())
def _flash_kvcache_fwd_op(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor | None, block_table: Tensor | None,
    head_bias: Tensor | None, alibi: Tensor | None,
    scale: float, const_bias: float, default_bias: bool, window_left: int, window_right: int, top_left: bool,
    deterministic: bool,
) -> Tensor:  # fmt: skip
    params = _params(scale, const_bias, default_bias, window_left, window_right, top_left, deterministic)
    return flash_kvcache_fwd(q, k_cache, v_cache, seqlens_k, params, head_bias, alibi, block_table)


@_flash_kvcache_fwd_op.register_fake
def _(q, k_cache, v_cache, seqlens_k, block_table, head_bias, alibi, *options):
    return _empty_like(q)


class _FlashEager(torch.autograd.Function):
    """The eager twin of the sigattn::flash_fwd and sigattn::flash_varlen_fwd ops: the same launchers and
    backward without the custom-op dispatch, which costs more than the kernel itself at short sequences
    (public call with autograd: 353 us against 165 us for the launcher on the H100's host). The ops stay
    for torch.compile, which needs their fake implementations."""

    @staticmethod
    def forward(ctx, q, k, v, head_bias, alibi, params, varlen):
        ctx.save_for_backward(q, k, v, head_bias, alibi, *(varlen[:2] if varlen else ()))
        ctx.params, ctx.max_seqlens = params, varlen[2:] if varlen else None
        if varlen:
            return flash_varlen_fwd(q, k, v, *varlen, params, head_bias, alibi)
        return flash_fwd(q, k, v, params, head_bias, alibi)

    @staticmethod
    def backward(ctx, do):
        q, k, v, head_bias, alibi, *cu_seqlens = ctx.saved_tensors
        if ctx.max_seqlens is not None:
            dq, dk, dv, dbias = flash_varlen_bwd(do, q, k, v, *cu_seqlens, *ctx.max_seqlens, ctx.params, head_bias,
                                                 alibi)  # fmt: skip
        else:
            dq, dk, dv, dbias = flash_bwd(do, q, k, v, ctx.params, head_bias, alibi)
        return dq, dk, dv, dbias, None, None, None


def flash_params(
    *, scale: float, bias: float | Tensor | None, causal: bool, window_size: tuple[int, int], top_left: bool = False,
    deterministic: bool = False,
) -> tuple[FlashParams, Tensor | None]:  # fmt: skip
    """The launchers' options for the public semantics: (params, per-head bias tensor or None)."""
    left, right = window_size
    if causal:
        right = 0
    head_bias = bias if isinstance(bias, Tensor) else None
    const_bias = float(bias) if bias is not None and head_bias is None else 0.0
    return FlashParams(float(scale), const_bias, bias is None, left, right, top_left, deterministic), head_bias


def _options(p: FlashParams) -> tuple:
    return p.scale, p.const_bias, p.default_bias, p.window_left, p.window_right, p.top_left, p.deterministic


def sigmoid_attn_flash(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    bias: float | Tensor | None,
    causal: bool,
    window_size: tuple[int, int],
    alibi_slopes: Tensor | None = None,
    top_left: bool = False,
    deterministic: bool = False,
) -> Tensor:
    """Dense sigmoid attention on the Triton kernels; semantics of ``reference.sigmoid_attn_reference``.
    ``deterministic``: a backward bit-identical across runs (else the Hopper one, whose dQ adds atomically)."""
    p, head_bias = flash_params(
        scale=scale, bias=bias, causal=causal, window_size=window_size, top_left=top_left, deterministic=deterministic
    )
    if not torch.compiler.is_compiling():
        return _FlashEager.apply(q, k, v, head_bias, alibi_slopes, p, None)
    return _flash_fwd_op(q, k, v, head_bias, alibi_slopes, *_options(p))


def sigmoid_attn_varlen_flash(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float,
    bias: float | Tensor | None,
    causal: bool,
    window_size: tuple[int, int],
    alibi_slopes: Tensor | None = None,
    top_left: bool = False,
) -> Tensor:
    """Packed sequences on the Triton kernels; semantics of ``reference.sigmoid_attn_varlen_reference``."""
    p, head_bias = flash_params(scale=scale, bias=bias, causal=causal, window_size=window_size, top_left=top_left)
    if not torch.compiler.is_compiling():
        varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return _FlashEager.apply(q, k, v, head_bias, alibi_slopes, p, varlen)
    return _flash_varlen_fwd_op(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, head_bias, alibi_slopes, *_options(p)
    )


def sigmoid_attn_kvcache_flash(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor | None,
    *,
    block_table: Tensor | None = None,
    scale: float,
    bias: float | Tensor | None,
    causal: bool,
    window_size: tuple[int, int],
    alibi_slopes: Tensor | None = None,
    top_left: bool = False,
) -> Tensor:
    """Attention against a KV cache on the Triton kernels (inference: no autograd); semantics of
    ``reference.sigmoid_attn_kvcache_reference``."""
    p, head_bias = flash_params(scale=scale, bias=bias, causal=causal, window_size=window_size, top_left=top_left)
    if not torch.compiler.is_compiling():
        # The op exists for torch.compile; eagerly its dispatch costs more than the kernel at short caches
        # (as for _FlashEager), and this op needs no autograd.
        return flash_kvcache_fwd(q, k_cache, v_cache, seqlens_k, p, head_bias, alibi_slopes, block_table)
    return _flash_kvcache_fwd_op(q, k_cache, v_cache, seqlens_k, block_table, head_bias, alibi_slopes, *_options(p))
