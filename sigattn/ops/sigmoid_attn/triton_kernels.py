"""FlashSigmoid: the Triton kernels of sigmoid attention (device code only; ``triton_host.py`` launches them).

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
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter cannot run inline assembly (no tanh.approx), and its tl.dot is wrong on bfloat16
# operands (Triton 3.6), so there the operands are upcast: they hold bf16-rounded values, so the product
# is the same fp32-accumulated one the GPU computes.
_HW_TANH = tl.constexpr(not INTERPRET)
_UPCAST_DOT = tl.constexpr(INTERPRET)


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
def _half_draws_kept(word, threshold):
    """(low half kept, high half kept) of 32-bit Philox words against the 16-bit ``threshold``."""
    return (word & 0xFFFF).to(tl.int32, bitcast=True) >= threshold, (word >> 16).to(tl.int32, bitcast=True) >= threshold


@triton.jit
def _kept(seed, bh, i, n0, threshold, BLOCK_N: tl.constexpr):
    """The weights attention dropout keeps (``dropout.py``) of queries ``i`` (a column [R, 1]) against the keys
    [n0, n0 + BLOCK_N) (n0 a multiple of 8), as an [R, BLOCK_N] tile: key j's draw is half j % 8 (low half
    first) of the words of philox(seed; j // 8, i, bh, 0). bh = batch row * heads + head (a scalar or [R, 1]).
    One Philox call per eight weights; the halves are joined along a new axis and folded into the keys' axis.
    The kernels zero the others and scale their fp32 sums by 1 / (1 - p) once, so that P stays in [0, 1] where
    it is rounded to 16 bits."""
    c = (n0 // 8 + tl.arange(0, BLOCK_N // 8))[None, :]
    zero = i * 0 + c * 0
    w0, w1, w2, w3 = tl.philox(seed, c + zero, i + zero, bh + zero, zero)
    a0, a1 = _half_draws_kept(w0, threshold)
    a2, a3 = _half_draws_kept(w1, threshold)
    a4, a5 = _half_draws_kept(w2, threshold)
    a6, a7 = _half_draws_kept(w3, threshold)
    # join appends an axis: x[r, c, p, q, s] = a[4p + 2q + s], so the row-major fold puts key 8c + e at a[e].
    x = tl.join(tl.join(tl.join(a0, a4), tl.join(a2, a6)), tl.join(tl.join(a1, a5), tl.join(a3, a7)))
    return tl.reshape(x, (x.shape[0], BLOCK_N))


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
               offs_dv, lo, hi, seqlen_k, key_lo, key_hi, kv_first, half_scale, half_bias, half_slope, diag_offset,
               window_left, window_right, seed, bh, dropout_threshold, HEAD_DIM: tl.constexpr,
               HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
               HAS_RIGHT: tl.constexpr, ALIBI: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
               TMA: tl.constexpr, DROPOUT: tl.constexpr):
    """acc += P V over key tiles [lo, hi). MASKED tiles load only the keys [key_lo, key_hi) that a row of the
    tile may see (others read as 0; with TMA, the descriptors start at key kv_first and end where no query
    looks further, so the keys no query sees read as 0), and mask every score but the allowed ones, the keys
    past Sk included: a query with an inf times a zero key row would otherwise give a NaN score."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = (offs_n >= key_lo) & (offs_n < key_hi)
        if TMA:  # keys outside the descriptors (before kv_first: negative coordinates) load as zeros
            k = KDesc.load([b, n0 - kv_first, h_kv, 0]).reshape(BLOCK_N, BLOCK_D)
            v = VDesc.load([b, n0 - kv_first, h_kv, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            k_rows, v_rows = _kv_offsets(n0, offs_n, Pages, stride_kp, stride_kn, stride_vp, stride_vn, seqlen_k,
                                         BLOCK_N, MASKED, PAGED, PAGE_SIZE)
            k = _load_rows(K, k_rows, key_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
            v = _load_rows(V, v_rows, key_ok, offs_dv, HEAD_DIM_V, BLOCK_DV, MASKED)
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
        if DROPOUT:
            p = tl.where(_kept(seed, bh, offs_m[:, None], n0, dropout_threshold, BLOCK_N), p, 0.0)
        acc = _dot(p.to(v.dtype), v, acc)  # [BM, BDV]
    return acc


@triton.jit
def sigmoid_attn_fwd_kernel(
    Q, K, V, Out, HeadBias, Alibi, CuSeqlensQ, CuSeqlensK, SeqlensK, BlockTable, KDesc, VDesc, stride_qb, stride_qm,
    stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_os, stride_ob, stride_om,
    stride_oh, stride_alibi_b, stride_bt, seqlen_q, seqlen_k, window_left, window_right, kv_first, half_scale,
    half_scale_bias, Seed, dropout_threshold, keep_scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    TOP_LEFT: tl.constexpr, HEAD_BIAS: tl.constexpr, DEFAULT_BIAS: tl.constexpr, ALIBI: tl.constexpr,
    VARLEN: tl.constexpr, KV_LENS: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, PACK_GQA: tl.constexpr, NUM_SPLITS: tl.constexpr,
    TMA: tl.constexpr, DROPOUT: tl.constexpr,
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
    offs_dv = tl.arange(0, BLOCK_DV)
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

    seed, bh = 0, 0
    if DROPOUT:  # (batch row, query head) of each row, as dropout.keep_mask counts them
        seed = tl.load(Seed)
        bh = b * (tl.num_programs(1) * GROUP if PACK_GQA else tl.num_programs(1)) + heads
        if PACK_GQA:
            bh = bh[:, None]

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_tiles(m0, diag_offset, seqlen_k, window_left, window_right,
                                          BLOCK_Q, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    lo, full_lo, full_hi, hi = _split_key_tiles(lo, full_lo, full_hi, hi, split, BLOCK_N, NUM_SPLITS)
    key_lo, key_hi = _visible_keys(m0, BLOCK_Q, diag_offset, seqlen_q, seqlen_k, window_left, window_right,
                                   HAS_LEFT, HAS_RIGHT)
    acc = _fwd_tiles(acc, q, K, V, KDesc, VDesc, b, h_kv, Pages, stride_kb, stride_kn, stride_vb, stride_vn, offs_m,
                     offs_d, offs_dv, lo, full_lo, seqlen_k, key_lo, key_hi, kv_first, half_scale, half_bias,
                     half_slope, diag_offset, window_left, window_right, seed, bh, dropout_threshold, HEAD_DIM,
                     HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, True, HAS_LEFT, HAS_RIGHT, ALIBI, PAGED, PAGE_SIZE, TMA,
                     DROPOUT)
    acc = _fwd_tiles(acc, q, K, V, KDesc, VDesc, b, h_kv, Pages, stride_kb, stride_kn, stride_vb, stride_vn, offs_m,
                     offs_d, offs_dv, full_lo, full_hi, seqlen_k, key_lo, key_hi, kv_first, half_scale, half_bias,
                     half_slope, diag_offset, window_left, window_right, seed, bh, dropout_threshold, HEAD_DIM,
                     HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, False, HAS_LEFT, HAS_RIGHT, ALIBI, PAGED, PAGE_SIZE, TMA,
                     DROPOUT)
    acc = _fwd_tiles(acc, q, K, V, KDesc, VDesc, b, h_kv, Pages, stride_kb, stride_kn, stride_vb, stride_vn, offs_m,
                     offs_d, offs_dv, full_hi, hi, seqlen_k, key_lo, key_hi, kv_first, half_scale, half_bias,
                     half_slope, diag_offset, window_left, window_right, seed, bh, dropout_threshold, HEAD_DIM,
                     HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, True, HAS_LEFT, HAS_RIGHT, ALIBI, PAGED, PAGE_SIZE, TMA,
                     DROPOUT)
    if HAS_LEFT or HAS_RIGHT:  # a query with no allowed key outputs 0, whatever the values it masks hold
        acc = tl.where(_sees_a_key(offs_m, diag_offset, seqlen_k, window_left, window_right, HAS_LEFT,
                                   HAS_RIGHT)[:, None], acc, 0.0)
    if DROPOUT:
        acc *= keep_scale
    Out += split * stride_os + b64 * stride_ob + q_start * stride_om
    _store_rows(Out, acc.to(Out.dtype.element_ty), offs_m * stride_om + heads * stride_oh, offs_m, offs_dv,
                seqlen_q, HEAD_DIM_V)


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
def _bwd_dkdv_tiles(dk, dv, k, v, Q, DO, stride_qm, stride_dom, offs_n, offs_d, offs_dv, lo, hi, seqlen_q, key_first,
                    key_last, half_scale, half_bias, half_slope, diag_offset, window_left, window_right, seed, bh,
                    dropout_threshold, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr):
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
        do = _load_rows(DO, offs_m * stride_dom, rows_ok, offs_dv, HEAD_DIM_V, BLOCK_DV, MASKED)
        # Transposed tiles (keys along rows): P^T and dS^T come out of the score dots in the layout the dV and
        # dK dots read from registers, with no transpose through shared memory.
        i, j = offs_m[None, :], offs_n[:, None]
        st = _dot(k, tl.trans(q), None)  # [BN, BM]
        pt = _sigmoid_of_half(_half_logits(st, i, j, half_scale, half_bias, half_slope, diag_offset, ALIBI))
        dpt = _dot(v, tl.trans(do), None)  # [BN, BM]
        if DROPOUT:  # the forward read the kept P (scaled after): dV takes it, dP only its kept weights
            kept = tl.trans(_kept(seed, bh, offs_m[:, None], key_first, dropout_threshold, BLOCK_N))
            dst = tl.where(kept, dpt, 0.0) * pt * (1.0 - pt)
            pt = tl.where(kept, pt, 0.0)
        else:
            dst = dpt * pt * (1.0 - pt)
        if MASKED:
            # Rows past Sq too: a key row holding an inf times their zero query is a NaN score.
            allowed = _counted(rows_ok[None, :], i, j, diag_offset, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            pt = tl.where(allowed, pt, 0.0)
            dst = tl.where(allowed, dst, 0.0)
        dv = _dot(pt.to(do.dtype), do, dv)  # [BN, BDV]
        dk = _dot(dst.to(q.dtype), q, dk)  # [BN, BD]
    return dk, dv


@triton.jit
def sigmoid_attn_bwd_kernel_dkdv(
    Q, K, V, DO, DK, DV, HeadBias, Alibi, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_alibi_b, seqlen_q, seqlen_k, window_left, window_right, scale, half_scale, half_scale_bias, Seed,
    dropout_threshold, keep_scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, TOP_LEFT: tl.constexpr, HEAD_BIAS: tl.constexpr,
    DEFAULT_BIAS: tl.constexpr, ALIBI: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
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
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(K + b64 * stride_kb + k_start * stride_kn + h_kv * stride_kh, offs_n * stride_kn,
                   offs_n < seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + b64 * stride_vb + k_start * stride_vn + h_kv * stride_vh, offs_n * stride_vn,
                   offs_n < seqlen_k, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    key_last = tl.minimum(n0 + BLOCK_N, seqlen_k) - 1
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_tiles(n0, diag_offset, seqlen_q, window_left, window_right,
                                            BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    for g in range(GROUP):
        h = h_kv * GROUP + g
        bh = b * tl.num_programs(1) * GROUP + h
        Qh = Q + b64 * stride_qb + q_start * stride_qm + h * stride_qh
        DOh = DO + b64 * stride_dob + q_start * stride_dom + h * stride_doh
        half_bias, half_slope = _head_terms(HeadBias, Alibi, stride_alibi_b, b, h, row_half_bias, ALIBI, HEAD_BIAS)
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, stride_qm, stride_dom, offs_n, offs_d, offs_dv, lo, full_lo,
                                 seqlen_q, n0, key_last, half_scale, half_bias, half_slope, diag_offset, window_left,
                                 window_right, seed, bh, dropout_threshold, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N,
                                 BLOCK_D, BLOCK_DV, True, HAS_LEFT, HAS_RIGHT, ALIBI, DROPOUT)
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, stride_qm, stride_dom, offs_n, offs_d, offs_dv, full_lo,
                                 full_hi, seqlen_q, n0, key_last, half_scale, half_bias, half_slope, diag_offset,
                                 window_left, window_right, seed, bh, dropout_threshold, HEAD_DIM, HEAD_DIM_V, BLOCK_M,
                                 BLOCK_N, BLOCK_D, BLOCK_DV, False, HAS_LEFT, HAS_RIGHT, ALIBI, DROPOUT)
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Qh, DOh, stride_qm, stride_dom, offs_n, offs_d, offs_dv, full_hi, hi,
                                 seqlen_q, n0, key_last, half_scale, half_bias, half_slope, diag_offset, window_left,
                                 window_right, seed, bh, dropout_threshold, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N,
                                 BLOCK_D, BLOCK_DV, True, HAS_LEFT, HAS_RIGHT, ALIBI, DROPOUT)
    if HAS_LEFT or HAS_RIGHT:  # a key no query may see gets exactly 0, whatever the rows that mask it hold
        seen = _sees_a_key(offs_n, -diag_offset, seqlen_q, window_right, window_left, HAS_RIGHT, HAS_LEFT)
        dk = tl.where(seen[:, None], dk, 0.0)
        dv = tl.where(seen[:, None], dv, 0.0)
    if DROPOUT:
        dk *= keep_scale
        dv *= keep_scale
    _store_rows(DK + b64 * stride_dkb + k_start * stride_dkn + h_kv * stride_dkh, (dk * scale).to(DK.dtype.element_ty),
                offs_n * stride_dkn, offs_n, offs_d, seqlen_k, HEAD_DIM)
    _store_rows(DV + b64 * stride_dvb + k_start * stride_dvn + h_kv * stride_dvh, dv.to(DV.dtype.element_ty),
                offs_n * stride_dvn, offs_n, offs_dv, seqlen_k, HEAD_DIM_V)


# ----------------------------------------------------------------------------------------------------
# backward: dQ (and the per-head bias gradient, as per-tile partial sums)


@triton.jit
def _bwd_dq_tiles(dq, dsum, q, do, K, V, stride_kn, stride_vn, offs_m, offs_d, offs_dv, lo, hi, key_lo, key_hi,
                  half_scale, half_bias, half_slope, diag_offset, window_left, window_right, seed, bh,
                  dropout_threshold, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
                  HAS_RIGHT: tl.constexpr, ALIBI: tl.constexpr, HEAD_BIAS: tl.constexpr, DROPOUT: tl.constexpr):
    """dQ of the query tile over key tiles [lo, hi); MASKED tiles as in ``_fwd_tiles``, with dS masked too."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = (offs_n >= key_lo) & (offs_n < key_hi)
        k = _load_rows(K, offs_n * stride_kn, key_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_rows(V, offs_n * stride_vn, key_ok, offs_dv, HEAD_DIM_V, BLOCK_DV, MASKED)
        s = _dot(q, tl.trans(k), None)  # [BM, BN]
        i, j = offs_m[:, None], offs_n[None, :]
        p = _sigmoid_of_half(_half_logits(s, i, j, half_scale, half_bias, half_slope, diag_offset, ALIBI))
        dp = _dot(do, tl.trans(v), None)  # [BM, BN]
        if DROPOUT:
            dp = tl.where(_kept(seed, bh, offs_m[:, None], n0, dropout_threshold, BLOCK_N), dp, 0.0)
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
    seqlen_q, seqlen_k, window_left, window_right, scale, half_scale, half_scale_bias, Seed, dropout_threshold,
    keep_scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, TOP_LEFT: tl.constexpr, HEAD_BIAS: tl.constexpr, DEFAULT_BIAS: tl.constexpr,
    ALIBI: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
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
    offs_dv = tl.arange(0, BLOCK_DV)
    K += b64 * stride_kb + k_start * stride_kn + (h // GROUP) * stride_kh
    V += b64 * stride_vb + k_start * stride_vn + (h // GROUP) * stride_vh
    half_bias, half_slope = _head_terms(HeadBias, Alibi, stride_alibi_b, b, h,
                                        _row_half_bias(seqlen_k, half_scale_bias, DEFAULT_BIAS), ALIBI, HEAD_BIAS)
    q = _load_rows(Q + b64 * stride_qb + q_start * stride_qm + h * stride_qh, offs_m * stride_qm, offs_m < seqlen_q,
                   offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b64 * stride_dob + q_start * stride_dom + h * stride_doh, offs_m * stride_dom,
                    offs_m < seqlen_q, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    bh = b * tl.num_programs(1) + h
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_tiles(m0, diag_offset, seqlen_k, window_left, window_right,
                                          BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    key_lo, key_hi = _visible_keys(m0, BLOCK_M, diag_offset, seqlen_q, seqlen_k, window_left, window_right,
                                   HAS_LEFT, HAS_RIGHT)
    dq, dsum = _bwd_dq_tiles(dq, dsum, q, do, K, V, stride_kn, stride_vn, offs_m, offs_d, offs_dv, lo, full_lo, key_lo,
                             key_hi, half_scale, half_bias, half_slope, diag_offset, window_left, window_right, seed,
                             bh, dropout_threshold, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, True, HAS_LEFT,
                             HAS_RIGHT, ALIBI, HEAD_BIAS, DROPOUT)
    dq, dsum = _bwd_dq_tiles(dq, dsum, q, do, K, V, stride_kn, stride_vn, offs_m, offs_d, offs_dv, full_lo, full_hi,
                             key_lo, key_hi, half_scale, half_bias, half_slope, diag_offset, window_left, window_right,
                             seed, bh, dropout_threshold, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, False,
                             HAS_LEFT, HAS_RIGHT, ALIBI, HEAD_BIAS, DROPOUT)
    dq, dsum = _bwd_dq_tiles(dq, dsum, q, do, K, V, stride_kn, stride_vn, offs_m, offs_d, offs_dv, full_hi, hi, key_lo,
                             key_hi, half_scale, half_bias, half_slope, diag_offset, window_left, window_right, seed,
                             bh, dropout_threshold, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, True, HAS_LEFT,
                             HAS_RIGHT, ALIBI, HEAD_BIAS, DROPOUT)
    if HAS_LEFT or HAS_RIGHT:  # a query with no allowed key gets exactly 0, whatever the keys it masks hold
        dq = tl.where(_sees_a_key(offs_m, diag_offset, seqlen_k, window_left, window_right, HAS_LEFT,
                                  HAS_RIGHT)[:, None], dq, 0.0)
    if DROPOUT:
        dq *= keep_scale
        dsum *= keep_scale
    _store_rows(DQ + b64 * stride_dqb + q_start * stride_dqm + h * stride_dqh, (dq * scale).to(DQ.dtype.element_ty),
                offs_m * stride_dqm, offs_m, offs_d, seqlen_q, HEAD_DIM)
    if HEAD_BIAS:
        # One partial sum per (b, h, query tile), reduced on the host in a fixed order: deterministic.
        n_tiles = tl.num_programs(0)
        # Rows past Sq (zero queries and dO) score NaN against a key row holding an inf: left out.
        dsum = tl.where(offs_m < seqlen_q, dsum, 0.0)
        tl.store(DBiasPartial + (b * tl.num_programs(1) + h) * n_tiles + i_m, tl.sum(dsum, axis=0))
