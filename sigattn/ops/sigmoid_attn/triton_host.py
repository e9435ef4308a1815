"""Host code of the Triton kernels (``triton_kernels.py``): tile tables, argument packing and launches.

``forward``, ``backward`` and ``decode`` take checked tensors (last dim contiguous, small tensors dense:
``kernels.py`` prepares them) and write into the buffers they are given. Every option comes from one
``Params`` (its ``Mask``) and the bias in its one form (``reference.Bias``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from . import host
from .params import Params, Rows
from .reference import Bias
from .triton_kernels import (
    INTERPRET,
    sigmoid_attn_bwd_kernel_dkdv,
    sigmoid_attn_bwd_kernel_dq,
    sigmoid_attn_fwd_kernel,
    sigmoid_attn_sum_splits_kernel,
)


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


def _config(table: dict[tuple[int, bool], TileConfig], flags: dict) -> TileConfig:
    """The tiles of ``table`` for the kernels' flags: keyed by the wider of the padded head dims (of q and k,
    of v), so that a value head dim below the query's (DeepSeek's 192/128) takes the tiles of 256."""
    if INTERPRET:
        return _INTERPRET_CONFIG
    return table[(max(64, flags["BLOCK_D"], flags["BLOCK_DV"]), flags["HAS_RIGHT"])]


def _arguments(q: Tensor, k: Tensor, v: Tensor, params: Params, bias: Bias, alibi: Tensor | None, rows: Rows):
    """(the constexpr flags, the runtime scalars) every kernel takes. (Absent tensors are passed as None:
    Triton compiles them as constants, and the flags keep the kernels from touching them.)"""
    num_heads, head_dim, head_dim_v = q.shape[-2], q.shape[-1], v.shape[-1]
    left, right = params.mask.bounds
    head_bias = bias if isinstance(bias, Tensor) else None
    flags = dict(
        GROUP=num_heads // k.shape[-2],
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_D=padded_head_dim(head_dim),
        BLOCK_DV=padded_head_dim(head_dim_v),
        HAS_LEFT=left >= 0,
        HAS_RIGHT=right >= 0,
        TOP_LEFT=params.mask.top_left,
        HEAD_BIAS=head_bias is not None,
        DEFAULT_BIAS=bias is None,
        ALIBI=alibi is not None,
        VARLEN=rows.varlen,
        DROPOUT=params.dropout is not None,
    )
    dropout = params.dropout
    scalars = dict(
        head_bias=head_bias,
        alibi_stride=alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0,
        window=(max(left, 0), max(right, 0)),
        half_bias=0.5 * bias if isinstance(bias, float) else 0.0,
        # (seed, threshold, keep scale): dropout.py's draw, or placeholders the kernels never read
        dropout=(dropout.seed, dropout.threshold, dropout.keep_scale) if dropout is not None else (None, 0, 1.0),
    )
    return flags, scalars


def _strides(t: Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; a packed (total, H, D) tensor has no batch dimension."""
    return (0, t.stride(0), t.stride(1)) if packed else tuple(t.stride()[:3])


# TMA (Hopper's tensor memory accelerator) loads the forward's K/V tiles of dense rows (_kv_descriptors):
# 0-5% faster than pointer loads at D128 (causal 4k 486 -> 505 TFLOP/s), mixed at D64 on an H100
# (benchmarks/results/tma_forward_h100_2026-11-24.json, whose script turns this off to compare). Only from
# TMA_MIN_KEYS keys on: encoding the two descriptors costs tens of microseconds of host time per call,
# more than the 0-3% it saves at 1k keys (same file), and shorter rows are bound by the host.
TMA_MIN_KEYS = 1024


@functools.lru_cache
def _has_tma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _kv_descriptors(
    k: Tensor, v: Tensor, rows: Rows, params: Params, block_n: int, block_d: int, block_dv: int
) -> tuple[TensorDescriptor, TensorDescriptor, int] | None:
    """TMA descriptors of K and V, blocks [1, BLOCK_N, 1, D] and [1, BLOCK_N, 1, Dv], and the key they start
    at, when the tiles can be loaded that way and it pays: dense rows (the descriptors cover the keys some
    query sees, ``host.visible_keys``, so keys before and after them load as zeros; a cache or packed sequences
    end elsewhere) of at least TMA_MIN_KEYS keys, unpadded head dims (a padded tile would read the next head),
    16-byte aligned base and strides, and a GPU that has TMA (sm_90+) or the interpreter."""
    if rows.varlen or rows.seqlens_k is not None or rows.block_table is not None:
        return None
    unpadded = k.shape[-1] == block_d and v.shape[-1] == block_dv
    if rows.seqlen_k < TMA_MIN_KEYS or not unpadded or not (INTERPRET or _has_tma(k.device)):
        return None
    tensors = (k, v)
    if not all(host.tma_addressable(t) for t in tensors):
        return None
    diag_offset = 0 if params.mask.top_left else rows.seqlen_k - rows.seqlen_q
    first, last = host.visible_keys(rows.seqlen_q, rows.seqlen_k, diag_offset, params.mask.bounds)
    if last == first:  # no query sees a key: nothing worth a descriptor
        return None
    blocks = ([1, block_n, 1, block_d], [1, block_n, 1, block_dv])
    views = (t[:, first:last] for t in tensors)
    return (
        *(TensorDescriptor(t, list(t.shape), list(t.stride()), b) for t, b in zip(views, blocks, strict=True)),
        first,
    )


def launch_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    params: Params,
    bias: Bias,
    alibi: Tensor | None,
    rows: Rows,
    cfg: TileConfig | None = None,
    *,
    pack_gqa: bool = False,
    num_splits: int = 1,
    use_tma: bool = True,
) -> None:
    """The forward of dense rows, packed sequences or cache rows into ``out``: shaped like q with v's head dim,
    or with num_splits > 1 an fp32 (num_splits, *that shape) buffer of partial sums. ``cfg``: the tiles
    (default: those of ``FWD_CONFIGS``); ``use_tma``: K/V tiles through TMA descriptors where
    ``_kv_descriptors`` allows."""
    flags, s = _arguments(q, k, v, params, bias, alibi, rows)
    cfg = cfg or _config(FWD_CONFIGS, flags)
    group = flags["GROUP"]
    block_q = cfg.block_m // group if pack_gqa else cfg.block_m
    num_heads = q.shape[-2]
    grid = (host.cdiv(rows.seqlen_q, block_q) * num_splits, num_heads // group if pack_gqa else num_heads, rows.batch)
    out_rows = out[0] if num_splits > 1 else out
    paged = rows.block_table is not None
    descriptors = (
        _kv_descriptors(k, v, rows, params, cfg.block_n, flags["BLOCK_D"], flags["BLOCK_DV"]) if use_tma else None
    )
    k_desc, v_desc, kv_first = descriptors or (k, v, 0)
    sigmoid_attn_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        s["head_bias"],
        alibi,
        rows.cu_seqlens_q,
        rows.cu_seqlens_k,
        rows.seqlens_k,
        rows.block_table,
        k_desc,
        v_desc,
        *_strides(q, rows.varlen),
        *_strides(k, rows.varlen),
        *_strides(v, rows.varlen),
        out.stride(0) if num_splits > 1 else 0,
        *_strides(out_rows, rows.varlen),
        s["alibi_stride"],
        rows.block_table.stride(0) if paged else 0,
        rows.seqlen_q,
        rows.seqlen_k,
        *s["window"],
        kv_first,
        0.5 * params.scale,
        s["half_bias"],
        *s["dropout"],
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_Q=block_q,
        KV_LENS=rows.seqlens_k is not None,
        PAGED=paged,
        PAGE_SIZE=k.shape[1] if paged else 1,
        PACK_GQA=pack_gqa,
        NUM_SPLITS=num_splits,
        TMA=descriptors is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **flags,
    )


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
    """Writes (dq, dk, dv) into ``grads``; returns the gradient of a per-head bias (else None). Two kernels
    and no atomics: deterministic."""
    dq, dk, dv = grads
    flags, s = _arguments(q, k, v, params, bias, alibi, rows)
    head_bias = s["head_bias"]
    cu = (rows.cu_seqlens_q, rows.cu_seqlens_k)
    num_heads, num_kv_heads = q.shape[-2], k.shape[-2]
    packed = rows.varlen
    common = (
        rows.seqlen_q,
        rows.seqlen_k,
        *s["window"],
        params.scale,
        0.5 * params.scale,
        s["half_bias"],
        *s["dropout"],
    )

    cfg = _config(BWD_DKDV_CONFIGS, flags)
    sigmoid_attn_bwd_kernel_dkdv[(host.cdiv(rows.seqlen_k, cfg.block_n), num_kv_heads, rows.batch)](
        q,
        k,
        v,
        do,
        dk,
        dv,
        head_bias,
        alibi,
        *cu,
        *_strides(q, packed),
        *_strides(k, packed),
        *_strides(v, packed),
        *_strides(do, packed),
        *_strides(dk, packed),
        *_strides(dv, packed),
        s["alibi_stride"],
        *common,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **flags,
    )

    cfg = _config(BWD_DQ_CONFIGS, flags)
    n_tiles = host.cdiv(rows.seqlen_q, cfg.block_m)
    partial = None
    if head_bias is not None:  # zeros: tiles past a packed sequence's end write nothing
        partial = torch.zeros(rows.batch, num_heads, n_tiles, dtype=torch.float32, device=q.device)
    sigmoid_attn_bwd_kernel_dq[(n_tiles, num_heads, rows.batch)](
        q,
        k,
        v,
        do,
        dq,
        partial,
        head_bias,
        alibi,
        *cu,
        *_strides(q, packed),
        *_strides(k, packed),
        *_strides(v, packed),
        *_strides(do, packed),
        *_strides(dq, packed),
        s["alibi_stride"],
        *common,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **flags,
    )
    return partial.sum(dim=(0, 2)).to(head_bias.dtype) if partial is not None else None


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def kvcache_plan(
    batch: int,
    seqlen_q: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    capacity: int,
    device: torch.device,
    paged: bool = False,
) -> tuple[TileConfig, bool, int]:
    """(tiles, pack the GQA group into one tile, number of key splits) for a KV-cache forward; ``head_dim``:
    the wider of the query/key and the value head dims.

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


def decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    out: Tensor,
    params: Params,
    bias: Bias,
    alibi: Tensor | None,
    rows: Rows,
    *,
    num_splits: int | None = None,
    pack_gqa: bool | None = None,
) -> None:
    """The forward against a KV cache (``rows``: its lengths and block table) into ``out``, planned by
    ``kvcache_plan``; ``num_splits``/``pack_gqa`` override the plan (tests force each path)."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    cfg, pack, splits = kvcache_plan(
        batch,
        seqlen_q,
        num_heads,
        k_cache.shape[2],
        max(head_dim, v_cache.shape[-1]),
        rows.seqlen_k,
        q.device,
        paged=rows.block_table is not None,
    )
    pack = pack if pack_gqa is None else pack_gqa
    splits = splits if num_splits is None else num_splits
    # No TMA: on a full cache (the only kind it could load) it measured -1.7% to +1% on an H100
    # (benchmarks/results/decode_large_batch_h100_2026-11-25.json).
    launch = functools.partial(
        launch_forward,
        q,
        k_cache,
        v_cache,
        params=params,
        bias=bias,
        alibi=alibi,
        rows=rows,
        cfg=cfg,
        pack_gqa=pack,
        use_tma=False,
    )
    if splits == 1:
        launch(out=out)
        return
    # The splits' partial outputs add exactly (no normalisation): a fixed-order fp32 sum, deterministic. A
    # second kernel sums them: the last split program to finish could, but its arrival counts need zeroing
    # every call, and that memset cost what this launch does (1-5% slower at B1-4 on an H200,
    # benchmarks/results/decode_split_sum_ab_h200_2026-12-03.json).
    partial = torch.empty(splits, *out.shape, dtype=torch.float32, device=q.device)
    launch(out=partial, num_splits=splits)
    if not out.is_contiguous():
        out.copy_(partial.sum(dim=0))
        return
    sum_splits(partial, out)


def sum_splits(partial: Tensor, out: Tensor) -> None:
    """out (contiguous) = the sum over dim 0 of ``partial`` (splits, *out.shape) fp32, by
    ``sigmoid_attn_sum_splits_kernel``."""
    splits = partial.shape[0]
    splits_p2 = triton.next_power_of_2(splits)
    block = max(32, SUM_SPLITS_ELEMENTS // splits_p2)
    sigmoid_attn_sum_splits_kernel[(host.cdiv(out.numel(), block),)](
        partial, out, out.numel(), NUM_SPLITS=splits, SPLITS_P2=splits_p2, BLOCK=block
    )
