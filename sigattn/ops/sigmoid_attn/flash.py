"""FlashSigmoid: Triton forward and backward kernels for sigmoid attention (dense, flash layout).

Top to bottom: tile configs -> jit helpers -> kernels -> launchers -> torch.library ops and autograd.
The algorithm (derivations in README.md): with no row max, row sum or rescaling, the forward is
``acc += sigmoid(z) @ V`` tile by tile and saves nothing but its inputs and output; the backward
recomputes P and uses dS = dP * P * (1 - P). Sigmoid is ``0.5 * tanh(x / 2) + 0.5`` with the hardware
``tanh.approx.f32`` (one special-function op per score) on the GPU, and the exact sigmoid in the CPU
interpreter, which cannot run inline assembly.

Masking: only the causal / sliding-window diagonal tiles apply a mask. Keys past Sk need none: their
V rows (and dO rows for queries past Sq) are loaded as zeros, so they add exactly nothing.
The backward is two kernels, dK/dV (one program per key tile and kv head, looping over the query heads
of its GQA group, so dK/dV are reduced over the group in registers) and dQ; neither uses atomics, so it is
deterministic.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

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
# and 128 are the fastest of two sweeps on an H100 (bf16, 16k tokens, seqlen 4096):
# benchmarks/results/tune_tiles_h100_2026-11-24.json and tune_tiles2_h100_2026-11-24.json. Forward D64 full
# 556 TFLOP/s, causal 465; D128 full 603, causal 507. In the backward, 64x64 dK/dV tiles beat 64x128 by
# 2x at D128 (3.9 ms vs 8.6 ms for the whole backward) and 8 warps lose 30-40% to 4 on 64x64 tiles.
# Head dims 32 and 256 are not tuned: 32 reuses 64's tiles, 256 halves them to fit the registers.
# The interpreter runs on the CPU, where small tiles keep tests fast and still cross tile boundaries.
_INTERPRET_CONFIG = TileConfig(16, 16, 1, 1)
FWD_CONFIGS = {
    (64, False): TileConfig(128, 64, 4, 3),
    (64, True): TileConfig(128, 64, 8, 4),
    (128, False): TileConfig(128, 32, 4, 4),
    (128, True): TileConfig(128, 32, 8, 4),
    (256, False): TileConfig(64, 32, 4, 2),
    (256, True): TileConfig(64, 32, 4, 2),
}
BWD_DKDV_CONFIGS = {
    (64, False): TileConfig(64, 64, 4, 4),
    (64, True): TileConfig(64, 64, 4, 4),
    (128, False): TileConfig(64, 64, 4, 2),
    (128, True): TileConfig(64, 64, 4, 2),
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


def padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


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
def _half_logits(s, offs_m, offs_n, half_scale, half_bias, half_slope, diag_offset, ALIBI: tl.constexpr):
    """z = logit / 2 for a [BM, BN] tile of raw scores s = q . k."""
    z = s * half_scale + half_bias
    if ALIBI:
        dist = offs_m[:, None] + diag_offset - offs_n[None, :]
        z -= half_slope * tl.abs(dist).to(tl.float32)
    return z


@triton.jit
def _allowed(offs_m, offs_n, diag_offset, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[BM, BN] window mask: i + off - left <= j <= i + off + right (causal is right = 0)."""
    diag = offs_m[:, None] + diag_offset
    ok = offs_n[None, :] >= 0
    if HAS_LEFT:
        ok = ok & (offs_n[None, :] >= diag - window_left)
    if HAS_RIGHT:
        ok = ok & (offs_n[None, :] <= diag + window_right)
    return ok


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
def _load_rows(ptr, offs_rows, stride_row, offs_d, n_rows,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """A [rows, BLOCK_D] tile; rows past n_rows (when CHECK_ROWS) and columns past HEAD_DIM read as 0."""
    ptrs = ptr + offs_rows[:, None] * stride_row + offs_d[None, :]
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=offs_rows[:, None] < n_rows, other=0.0)
        else:
            return tl.load(ptrs, mask=(offs_rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _store_rows(ptr, value, offs_rows, stride_row, offs_d, n_rows, HEAD_DIM: tl.constexpr):
    ptrs = ptr + offs_rows[:, None] * stride_row + offs_d[None, :]
    tl.store(ptrs, value, mask=(offs_rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _head_terms(HeadBias, Alibi, stride_alibi_b, b, h, half_scale_bias, ALIBI: tl.constexpr, HEAD_BIAS: tl.constexpr):
    """(bias / 2, slope / 2) of query head h in batch row b."""
    half_bias = half_scale_bias
    if HEAD_BIAS:
        half_bias = 0.5 * tl.load(HeadBias + h).to(tl.float32)
    half_slope = 0.0
    if ALIBI:
        half_slope = 0.5 * tl.load(Alibi + b * stride_alibi_b + h).to(tl.float32)
    return half_bias, half_slope


# ----------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_tiles(acc, q, K, V, stride_kn, stride_vn, offs_m, offs_d, lo, hi, seqlen_k,
               half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ALIBI: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, stride_kn, offs_d, seqlen_k, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_rows(V, offs_n, stride_vn, offs_d, seqlen_k, HEAD_DIM, BLOCK_D, MASKED)
        s = _dot(q, tl.trans(k), None)  # [BM, BN]
        p = _sigmoid_of_half(_half_logits(s, offs_m, offs_n, half_scale, half_bias, half_slope, diag_offset, ALIBI))
        if MASKED and (HAS_LEFT or HAS_RIGHT):
            allowed = _allowed(offs_m, offs_n, diag_offset, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            p = tl.where(allowed, p, 0.0)
        acc = _dot(p.to(v.dtype), v, acc)  # [BM, BD]
    return acc


@triton.jit
def sigmoid_attn_fwd_kernel(
    Q, K, V, Out, HeadBias, Alibi,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_ob, stride_om, stride_oh, stride_alibi_b,
    seqlen_q, seqlen_k, diag_offset, window_left, window_right, half_scale, half_scale_bias,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HEAD_BIAS: tl.constexpr,
    ALIBI: tl.constexpr,
):
    i_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m0 = i_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    half_bias, half_slope = _head_terms(HeadBias, Alibi, stride_alibi_b, b, h, half_scale_bias, ALIBI, HEAD_BIAS)

    q = _load_rows(Q, offs_m, stride_qm, offs_d, seqlen_q, HEAD_DIM, BLOCK_D, True)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_tiles(m0, diag_offset, seqlen_k, window_left, window_right,
                                          BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    acc = _fwd_tiles(acc, q, K, V, stride_kn, stride_vn, offs_m, offs_d, lo, full_lo, seqlen_k,
                     half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                     HEAD_DIM, BLOCK_N, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, ALIBI)
    acc = _fwd_tiles(acc, q, K, V, stride_kn, stride_vn, offs_m, offs_d, full_lo, full_hi, seqlen_k,
                     half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                     HEAD_DIM, BLOCK_N, BLOCK_D, False, HAS_LEFT, HAS_RIGHT, ALIBI)
    acc = _fwd_tiles(acc, q, K, V, stride_kn, stride_vn, offs_m, offs_d, full_hi, hi, seqlen_k,
                     half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                     HEAD_DIM, BLOCK_N, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, ALIBI)
    _store_rows(Out + b * stride_ob + h * stride_oh, acc.to(Out.dtype.element_ty), offs_m, stride_om, offs_d,
                seqlen_q, HEAD_DIM)


# ----------------------------------------------------------------------------------------------------
# backward: dK, dV


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, Q, DO, stride_qm, stride_dom, offs_n, offs_d, lo, hi, seqlen_q,
                    half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ALIBI: tl.constexpr):
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, offs_m, stride_qm, offs_d, seqlen_q, HEAD_DIM, BLOCK_D, MASKED)
        do = _load_rows(DO, offs_m, stride_dom, offs_d, seqlen_q, HEAD_DIM, BLOCK_D, MASKED)
        s = _dot(q, tl.trans(k), None)  # [BM, BN]
        p = _sigmoid_of_half(_half_logits(s, offs_m, offs_n, half_scale, half_bias, half_slope, diag_offset, ALIBI))
        if MASKED and (HAS_LEFT or HAS_RIGHT):
            allowed = _allowed(offs_m, offs_n, diag_offset, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            p = tl.where(allowed, p, 0.0)
        dv = _dot(tl.trans(p.to(do.dtype)), do, dv)  # [BN, BD]
        dp = _dot(do, tl.trans(v), None)  # [BM, BN]
        ds = dp * p * (1.0 - p)
        dk = _dot(tl.trans(ds.to(q.dtype)), q, dk)  # [BN, BD]
    return dk, dv


@triton.jit
def sigmoid_attn_bwd_kernel_dkdv(
    Q, K, V, DO, DK, DV, HeadBias, Alibi,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_alibi_b, seqlen_q, seqlen_k, diag_offset, window_left, window_right, scale, half_scale, half_scale_bias,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HEAD_BIAS: tl.constexpr,
    ALIBI: tl.constexpr,
):
    i_n, h_kv, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n0 = i_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * stride_kb + h_kv * stride_kh, offs_n, stride_kn, offs_d, seqlen_k, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + b * stride_vb + h_kv * stride_vh, offs_n, stride_vn, offs_d, seqlen_k, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_tiles(n0, diag_offset, seqlen_q, window_left, window_right,
                                            BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for g in range(GROUP):
        h = h_kv * GROUP + g
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        half_bias, half_slope = _head_terms(HeadBias, Alibi, stride_alibi_b, b, h, half_scale_bias, ALIBI, HEAD_BIAS)
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, stride_qm, stride_dom, offs_n, offs_d, lo, full_lo, seqlen_q,
                                 half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                                 HEAD_DIM, BLOCK_M, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, ALIBI)
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, stride_qm, stride_dom, offs_n, offs_d, full_lo, full_hi,
                                 seqlen_q, half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                                 HEAD_DIM, BLOCK_M, BLOCK_D, False, HAS_LEFT, HAS_RIGHT, ALIBI)
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, stride_qm, stride_dom, offs_n, offs_d, full_hi, hi, seqlen_q,
                                 half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                                 HEAD_DIM, BLOCK_M, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, ALIBI)
    _store_rows(DK + b * stride_dkb + h_kv * stride_dkh, (dk * scale).to(DK.dtype.element_ty), offs_n, stride_dkn,
                offs_d, seqlen_k, HEAD_DIM)
    _store_rows(DV + b * stride_dvb + h_kv * stride_dvh, dv.to(DV.dtype.element_ty), offs_n, stride_dvn, offs_d,
                seqlen_k, HEAD_DIM)


# ----------------------------------------------------------------------------------------------------
# backward: dQ (and the per-head bias gradient, as per-tile partial sums)


@triton.jit
def _bwd_dq_tiles(dq, dsum, q, do, K, V, stride_kn, stride_vn, offs_m, offs_d, lo, hi, seqlen_k,
                  half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ALIBI: tl.constexpr,
                  HEAD_BIAS: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, stride_kn, offs_d, seqlen_k, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_rows(V, offs_n, stride_vn, offs_d, seqlen_k, HEAD_DIM, BLOCK_D, MASKED)
        s = _dot(q, tl.trans(k), None)  # [BM, BN]
        p = _sigmoid_of_half(_half_logits(s, offs_m, offs_n, half_scale, half_bias, half_slope, diag_offset, ALIBI))
        if MASKED and (HAS_LEFT or HAS_RIGHT):
            allowed = _allowed(offs_m, offs_n, diag_offset, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            p = tl.where(allowed, p, 0.0)
        dp = _dot(do, tl.trans(v), None)  # [BM, BN]
        ds = dp * p * (1.0 - p)
        dq = _dot(ds.to(k.dtype), k, dq)  # [BM, BD]
        if HEAD_BIAS:
            dsum += tl.sum(ds, axis=1)
    return dq, dsum


@triton.jit
def sigmoid_attn_bwd_kernel_dq(
    Q, K, V, DO, DQ, DBiasPartial, HeadBias, Alibi,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh, stride_alibi_b,
    seqlen_q, seqlen_k, diag_offset, window_left, window_right, scale, half_scale, half_scale_bias,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HEAD_BIAS: tl.constexpr,
    ALIBI: tl.constexpr,
):
    i_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m0 = i_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    half_bias, half_slope = _head_terms(HeadBias, Alibi, stride_alibi_b, b, h, half_scale_bias, ALIBI, HEAD_BIAS)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, seqlen_q, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dom, offs_d, seqlen_q, HEAD_DIM, BLOCK_D, True)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_tiles(m0, diag_offset, seqlen_k, window_left, window_right,
                                          BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    dq, dsum = _bwd_dq_tiles(dq, dsum, q, do, K, V, stride_kn, stride_vn, offs_m, offs_d, lo, full_lo, seqlen_k,
                             half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                             HEAD_DIM, BLOCK_N, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, ALIBI, HEAD_BIAS)
    dq, dsum = _bwd_dq_tiles(dq, dsum, q, do, K, V, stride_kn, stride_vn, offs_m, offs_d, full_lo, full_hi, seqlen_k,
                             half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                             HEAD_DIM, BLOCK_N, BLOCK_D, False, HAS_LEFT, HAS_RIGHT, ALIBI, HEAD_BIAS)
    dq, dsum = _bwd_dq_tiles(dq, dsum, q, do, K, V, stride_kn, stride_vn, offs_m, offs_d, full_hi, hi, seqlen_k,
                             half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                             HEAD_DIM, BLOCK_N, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, ALIBI, HEAD_BIAS)
    _store_rows(DQ + b * stride_dqb + h * stride_dqh, (dq * scale).to(DQ.dtype.element_ty), offs_m, stride_dqm,
                offs_d, seqlen_q, HEAD_DIM)
    if HEAD_BIAS:
        # One partial sum per (b, h, query tile), reduced on the host in a fixed order: deterministic.
        n_tiles = tl.num_programs(0)
        tl.store(DBiasPartial + (b * tl.num_programs(1) + h) * n_tiles + i_m, tl.sum(dsum, axis=0))


# ----------------------------------------------------------------------------------------------------
# launchers: callable without autograd


@dataclass(frozen=True)
class FlashParams:
    """The non-tensor options of one call. window bounds of -1 are unbounded; causal is right = 0."""

    scale: float
    const_bias: float  # used when there is no per-head bias tensor
    window_left: int
    window_right: int
    top_left: bool


def _common_args(q: Tensor, k: Tensor, params: FlashParams, head_bias: Tensor | None, alibi: Tensor | None):
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    diag_offset = 0 if params.top_left else seqlen_k - seqlen_q
    flags = dict(
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=padded_head_dim(head_dim),
        HAS_LEFT=params.window_left >= 0,
        HAS_RIGHT=params.window_right >= 0,
        HEAD_BIAS=head_bias is not None,
        ALIBI=alibi is not None,
    )
    alibi_stride = alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0
    window = (max(params.window_left, 0), max(params.window_right, 0))
    return flags, alibi_stride, diag_offset, window


def _dummy(q: Tensor) -> Tensor:
    return q.new_empty(1, dtype=torch.float32)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


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
    batch, seqlen_q, num_heads, head_dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if out.numel() == 0:
        return out
    flags, alibi_stride, diag_offset, (left, right) = _common_args(q, k, params, head_bias, alibi)
    cfg = _config(FWD_CONFIGS, flags["BLOCK_D"], flags["HAS_RIGHT"])
    grid = (triton.cdiv(seqlen_q, cfg.block_m), num_heads, batch)
    sigmoid_attn_fwd_kernel[grid](
        q, k, v, out, head_bias if head_bias is not None else _dummy(q), alibi if alibi is not None else _dummy(q),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], alibi_stride,
        seqlen_q, k.shape[1], diag_offset, left, right, 0.5 * params.scale, 0.5 * params.const_bias,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )  # fmt: skip
    return out


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
    """Backward: (dq, dk, dv, dbias or None). Deterministic: no atomics anywhere.
    ``grads`` = (dq, dk, dv) buffers receive the results when given (tests poison them)."""
    q, k, v, do = (_last_dim_contiguous(t) for t in (q, k, v, do))
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    if grads is None:
        grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    dq, dk, dv = grads
    if q.numel() == 0 or k.numel() == 0:
        for grad in grads:
            grad.zero_()
        return dq, dk, dv, (torch.zeros_like(head_bias) if head_bias is not None else None)
    flags, alibi_stride, diag_offset, (left, right) = _common_args(q, k, params, head_bias, alibi)
    bias_ptr = head_bias if head_bias is not None else _dummy(q)
    alibi_ptr = alibi if alibi is not None else _dummy(q)
    half = (0.5 * params.scale, 0.5 * params.const_bias)

    cfg = _config(BWD_DKDV_CONFIGS, flags["BLOCK_D"], flags["HAS_RIGHT"])
    sigmoid_attn_bwd_kernel_dkdv[(triton.cdiv(seqlen_k, cfg.block_n), num_kv_heads, batch)](
        q, k, v, do, dk, dv, bias_ptr, alibi_ptr,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        alibi_stride, seqlen_q, seqlen_k, diag_offset, left, right, params.scale, *half,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )  # fmt: skip

    cfg = _config(BWD_DQ_CONFIGS, flags["BLOCK_D"], flags["HAS_RIGHT"])
    n_tiles = triton.cdiv(seqlen_q, cfg.block_m)
    partial = None
    if head_bias is not None:
        partial = torch.empty(batch, num_heads, n_tiles, dtype=torch.float32, device=q.device)
    sigmoid_attn_bwd_kernel_dq[(n_tiles, num_heads, batch)](
        q, k, v, do, dq, partial if partial is not None else _dummy(q), bias_ptr, alibi_ptr,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        alibi_stride, seqlen_q, seqlen_k, diag_offset, left, right, params.scale, *half,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )  # fmt: skip
    dbias = partial.sum(dim=(0, 2)).to(head_bias.dtype) if partial is not None else None
    return dq, dk, dv, dbias


# ----------------------------------------------------------------------------------------------------
# torch.library ops (so torch.compile traces them as opaque nodes) and autograd


def _params(scale, const_bias, window_left, window_right, top_left) -> FlashParams:
    return FlashParams(float(scale), float(const_bias), int(window_left), int(window_right), bool(top_left))


@torch.library.custom_op("sigattn::flash_fwd", mutates_args=())
def _flash_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, head_bias: Tensor | None, alibi: Tensor | None,
    scale: float, const_bias: float, window_left: int, window_right: int, top_left: bool,
) -> Tensor:  # fmt: skip
    return flash_fwd(q, k, v, _params(scale, const_bias, window_left, window_right, top_left), head_bias, alibi)


@_flash_fwd_op.register_fake
def _(q, k, v, head_bias, alibi, scale, const_bias, window_left, window_right, top_left):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("sigattn::flash_bwd", mutates_args=())
def _flash_bwd_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, head_bias: Tensor | None, alibi: Tensor | None,
    scale: float, const_bias: float, window_left: int, window_right: int, top_left: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    params = _params(scale, const_bias, window_left, window_right, top_left)
    dq, dk, dv, dbias = flash_bwd(do, q, k, v, params, head_bias, alibi)
    # custom ops cannot return None: an empty tensor stands for "no bias gradient".
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(0, dtype=torch.float32)


@_flash_bwd_op.register_fake
def _(do, q, k, v, head_bias, alibi, scale, const_bias, window_left, window_right, top_left):
    like = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    dbias = torch.empty_like(head_bias) if head_bias is not None else q.new_empty(0, dtype=torch.float32)
    return (*like, dbias)


def _setup_context(ctx, inputs, output):
    q, k, v, head_bias, alibi, *options = inputs
    ctx.save_for_backward(q, k, v, head_bias, alibi)
    ctx.options = options


def _backward(ctx, grad_out):
    q, k, v, head_bias, alibi = ctx.saved_tensors
    dq, dk, dv, dbias = _flash_bwd_op(grad_out, q, k, v, head_bias, alibi, *ctx.options)
    return dq, dk, dv, (dbias if head_bias is not None else None), None, None, None, None, None, None


_flash_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def flash_params(
    seqlen_k: int, *, scale: float, bias: float | Tensor | None, causal: bool, window_size: tuple[int, int],
    top_left: bool = False,
) -> tuple[FlashParams, Tensor | None]:  # fmt: skip
    """The launchers' options for the public semantics: (params, per-head bias tensor or None)."""
    left, right = window_size
    if causal:
        right = 0
    head_bias = bias if isinstance(bias, Tensor) else None
    if bias is None:
        const_bias = -math.log(seqlen_k) if seqlen_k > 0 else 0.0
    else:
        const_bias = 0.0 if head_bias is not None else float(bias)
    return FlashParams(float(scale), const_bias, left, right, top_left), head_bias


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
) -> Tensor:
    """Dense sigmoid attention on the Triton kernels; semantics of ``reference.sigmoid_attn_reference``."""
    p, head_bias = flash_params(
        k.shape[1], scale=scale, bias=bias, causal=causal, window_size=window_size, top_left=top_left
    )
    return _flash_fwd_op(
        q, k, v, head_bias, alibi_slopes, p.scale, p.const_bias, p.window_left, p.window_right, p.top_left
    )
