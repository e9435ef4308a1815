"""The public functions: flash-attn's (batch, seqlen, heads, headdim) family and an SDPA-style function.

Each validates its inputs, describes the call once (``AttnCall``) and hands it to the dispatcher, which
picks a backend (see ``sigattn.backends``). The semantics are defined once, in
``sigattn.ops.sigmoid_attn.reference``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import validation
from .backends import AttnCall, dispatch, select_backend
from .ops.sigmoid_attn.cache import append_kv
from .ops.sigmoid_attn.dropout import Dropout, draw_seed
from .ops.sigmoid_attn.reference import Mask


def _resolve_scale(scale, head_dim: int, softmax_scale=None) -> float:
    """The logit scale: ``scale``, or flash-attn's name for it, ``softmax_scale`` (not both), else
    ``1 / sqrt(head_dim)``."""
    if softmax_scale is not None:
        if scale is not None:
            raise ValueError(
                f"scale and softmax_scale name the same argument (softmax_scale is flash-attn's name): pass one, "
                f"got scale={scale!r} and softmax_scale={softmax_scale!r}"
            )
        validation.check_scale(softmax_scale, "softmax_scale")
        return float(softmax_scale)
    validation.check_scale(scale)
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _dropout(dropout_p, q: Tensor) -> Dropout | None:
    """The call's dropout with a fresh seed (validation.check_dropout_p first), or None for p = 0. Drawn
    after every other check: a call that raises consumes nothing of the generator."""
    if dropout_p == 0:
        return None
    return Dropout(float(dropout_p), draw_seed(q.device))


def _check_options(q, bias, window_size, alibi_slopes, causal, deterministic, batch, longest) -> tuple[int, int]:
    """Checks the options shared by every function; returns the window with bounds of ``longest`` or more
    (the most queries or keys a sequence of the call can have) as -1, unbounded."""
    num_heads = q.shape[-2]
    validation.check_bias(bias, num_heads, q)
    window = validation.check_window(window_size, longest)
    validation.check_alibi(alibi_slopes, batch, num_heads, q)
    validation.check_flag(causal, "causal")
    validation.check_flag(deterministic, "deterministic")
    return window


def sigmoid_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    *,
    bias: float | Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    softmax_scale: float | None = None,
) -> Tensor:
    """Sigmoid attention in flash-attn's layout.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k: (batch, seqlen_k, nheads_k, headdim). nheads must be a multiple of nheads_k (GQA/MQA):
            query head h reads key/value head ``h // (nheads // nheads_k)``.
        v: (batch, seqlen_k, nheads_k, headdim_v): the value head dim may differ from the query/key one
            (DeepSeek's 192/128), as in FlashAttention 3 and cuDNN.
        dropout_p: attention dropout, in [0, 1) (flash-attn's 4th argument; pass 0 in evaluation): each
            weight is zeroed with probability dropout_p and the others scaled by 1 / (1 - dropout_p). The
            weights dropped are drawn from a seed taken from PyTorch's generator of q's device, so
            ``torch.manual_seed`` makes them reproducible, and the backward drops the same ones
            (``sigattn.ops.sigmoid_attn.dropout`` says which).
        bias: a float; a tensor of shape (nheads,), one per head, which receives a gradient; or None
            for ``-log(seqlen_k)``. Models should pass an explicit constant, ``-log`` of the training
            context length, so that inference at other lengths uses the bias the model was trained with.
        scale: the logit scale; default ``1 / sqrt(headdim)``.
        causal: bottom-right aligned causal mask (below).
        window_size: (left, right) sliding window (below); (-1, -1) is unbounded.
        alibi_slopes: float32 (nheads,) or (batch, nheads); adds ``-slope * |i + Sk - Sq - j|``.
        deterministic: require a deterministic backward (bit-identical across runs); otherwise, on Hopper,
            the backward adds dQ with atomic reductions.
        softmax_scale: flash-attn's name for ``scale``, accepted so that its calls work unchanged; give
            one of the two.

    Attention weights are ``sigmoid(scale * q_i . k_j + bias - slope * |i + Sk - Sq - j|)`` (the ALiBi
    term only with ``alibi_slopes``) for allowed keys and exactly 0 for masked ones; a query with no
    allowed key outputs 0. Masks are aligned to the bottom-right corner of the score matrix (flash-attn):
    query i sits at key position ``i + Sk - Sq``. With ``causal=True`` query i sees key j iff
    ``j <= i + Sk - Sq``; for Sq = 2, Sk = 5 (1 = allowed):

        1 1 1 1 0
        1 1 1 1 1

    and for Sq = 5, Sk = 2 the first three rows see nothing and output 0:

        0 0
        0 0
        0 0
        1 0
        1 1

    ``window_size=(left, right)`` allows ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``; -1 leaves
    that side unbounded, and ``causal=True`` sets right to 0.

    Returns:
        (batch, seqlen_q, nheads, headdim_v), in the dtype of q. Inputs may be float16, bfloat16, float32
        (float64 on the PyTorch backends) and non-contiguous.
    """
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        validation.check_tensor(t, n, 4, "(batch, seqlen, nheads, headdim)")
    validation.check_qkv(q, k, v, ("q", "k", "v"), ("(B, Sq, Hq, D)", "(B, Sk, Hkv, D|Dv)"))
    longest = max(q.shape[1], k.shape[1])
    window = _check_options(q, bias, window_size, alibi_slopes, causal, deterministic, q.shape[0], longest)
    validation.check_dropout_p(dropout_p)
    scale = _resolve_scale(scale, q.shape[-1], softmax_scale)
    dropout = _dropout(dropout_p, q)
    call = AttnCall("dense", q, k, v, scale, bias, Mask(causal, window), alibi_slopes, deterministic, dropout=dropout)
    return dispatch(call)


def sigmoid_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    *,
    bias: float | Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    softmax_scale: float | None = None,
) -> Tensor:
    """Sigmoid attention over packed variable-length sequences (flash-attn's varlen layout).

    Args:
        q: (total_q, nheads, headdim), the queries of all sequences concatenated.
        k, v: (total_k, nheads_k, headdim) and (total_k, nheads_k, headdim_v) (v's head dim may differ).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), cumulative lengths starting at 0 and ending at
            total_q / total_k. Sequence b holds q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] and likewise k, v.
        max_seqlen_q, max_seqlen_k: the longest query / key length (at least the true maximum).
        dropout_p: attention dropout, as in ``sigmoid_attn_func`` (flash-attn's 8th argument); sequence b
            draws its weights as batch row b of a dense call would.
        bias: as in ``sigmoid_attn_func``; None means ``-log(seqlen_k)`` of each sequence's own key length.
        alibi_slopes: float32 (nheads,) or (batch, nheads).
        Other options as in ``sigmoid_attn_func``; Sq and Sk in the masks are each sequence's lengths.

    Every sequence is attended on its own, exactly as ``sigmoid_attn_func`` on a batch of one.
    The values of cu_seqlens are checked on the CPU; on a GPU only with SIGATTN_CHECK_VALUES=1 (reading
    them would synchronise with the device on every call), never under CUDA-graph capture or torch.compile.

    Returns:
        (total_q, nheads, headdim_v), in the dtype of q.
    """
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        validation.check_tensor(t, n, 3, "(total, nheads, headdim)")
    validation.check_qkv(q, k, v, ("q", "k", "v"), ("(total_q, Hq, D)", "(total_k, Hkv, D|Dv)"), same_batch=False)
    validation.check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q", q.device)
    validation.check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k", q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same shape (batch + 1,), "
            f"got {tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}"
        )
    batch = cu_seqlens_q.shape[0] - 1
    # No sequence is longer than the packed tensors (max_seqlen_* may be larger; they only size grids).
    longest = max(q.shape[0], k.shape[0])
    window = _check_options(q, bias, window_size, alibi_slopes, causal, deterministic, batch, longest)
    validation.check_dropout_p(dropout_p)
    scale = _resolve_scale(scale, q.shape[-1], softmax_scale)
    dropout = _dropout(dropout_p, q)
    call = AttnCall(
        "varlen",
        q,
        k,
        v,
        scale,
        bias,
        Mask(causal, window),
        alibi_slopes,
        deterministic,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        # No sequence is longer than its packed tensor, and the kernels launch programs for every
        # max_seqlen position: a larger one (up to the integer limits) would launch that many idle programs.
        max_seqlen_q=min(int(max_seqlen_q), q.shape[0]),
        max_seqlen_k=min(int(max_seqlen_k), k.shape[0]),
        dropout=dropout,
    )
    return dispatch(call)


def _check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table) -> tuple[Tensor | None, int]:
    """Checks the cache arguments; returns cache_seqlens as a (B,) tensor (or None) and the capacity."""
    validation.check_tensor(q, "q", 4, "(batch, seqlen_q, nheads, headdim)")
    paged = block_table is not None
    cache_layout = "(num_blocks, page_size, nheads_k, D|Dv)" if paged else "(batch, seqlen_cache, nheads_k, D|Dv)"
    for t, n in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        validation.check_tensor(t, n, 4, cache_layout)
    # A paged cache's dim 0 counts pages, not batch rows: the batch is checked below.
    names = ("q", "k_cache", "v_cache")
    validation.check_qkv(q, k_cache, v_cache, names, ("(B, Sq, Hq, D)", cache_layout), same_batch=False)
    batch = q.shape[0]
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values to append), got only one")
    if k is not None:
        for t, n, cache in ((k, "k", k_cache), (v, "v", v_cache)):
            validation.check_tensor(t, n, 4, "(batch, seqlen_new, nheads_k, headdim)")
            if t.dtype != k_cache.dtype or t.device != k_cache.device:
                raise TypeError(
                    f"{n} must match the cache's dtype and device ({k_cache.dtype}, {k_cache.device}), "
                    f"got {t.dtype} on {t.device}"
                )
            if t.shape[0] != batch or t.shape[2:] != cache.shape[2:]:
                raise ValueError(
                    f"{n} must have shape (B, seqlen_new, Hkv, {'Dv' if n == 'v' else 'D'}) = ({batch}, *, "
                    f"{cache.shape[2]}, {cache.shape[3]}), got {tuple(t.shape)}"
                )
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"k and v must have the same length (dim 1), got {tuple(k.shape)} and {tuple(v.shape)}")
        for t, n in ((k_cache, "k_cache"), (v_cache, "v_cache")):
            # An expanded view maps several cache slots to one element: the append would write it twice.
            if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape, strict=True)):
                raise ValueError(
                    f"{n} must own its memory to take appended k and v, got an expanded view with strides "
                    f"{t.stride()} (a 0 stride); pass a cache made by torch.empty or torch.zeros"
                )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (k, v, k_cache, v_cache)):
        raise ValueError(
            "sigmoid_attn_with_kvcache is for inference: k, v, k_cache and v_cache must not require grad "
            "(only q may); use sigmoid_attn_func to train"
        )

    if paged:
        if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
            raise TypeError(
                "block_table must be an int32 tensor of shape (batch, max_blocks), "
                f"got {validation.describe(block_table)}"
            )
        if block_table.shape[0] != batch:
            raise ValueError(
                f"block_table must have shape (batch, max_blocks) with batch = {batch}, got {tuple(block_table.shape)}"
            )
        if block_table.device != q.device:
            raise ValueError(f"block_table must be on the device of q ({q.device}), got {block_table.device}")
        if k_cache.shape[1] == 0:  # positions map to pages by dividing by the page size
            raise ValueError(
                "a paged k_cache must have pages of at least 1 token (page_size, dim 1), "
                f"got shape {tuple(k_cache.shape)}"
            )
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        if k_cache.shape[0] != batch:
            raise ValueError(f"k_cache must have the batch size of q ({batch}), got shape {tuple(k_cache.shape)}")
        capacity = k_cache.shape[1]

    num_new = 0 if k is None else k.shape[1]
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required to append k and v: it says where each row's new tokens go")
        if paged and validation.values_checkable(q.device):  # a full cache uses every page of every row
            _check_block_table_entries(block_table, torch.full((batch,), capacity, device=q.device), k_cache)
        return None, capacity
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        # A host value: checked on every device (a tensor's values only where values_checkable), and before it
        # becomes an int32 tensor, which a value past 2^31 - 1 would overflow.
        if cache_seqlens < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens}")
        if cache_seqlens + num_new > capacity:
            raise _cache_too_small(cache_seqlens + num_new, capacity, paged)
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    validation.check_index_vector(cache_seqlens, "cache_seqlens", batch, q.device)
    if validation.values_checkable(q.device):
        lengths = cache_seqlens.long() + num_new
        if bool((cache_seqlens < 0).any()):
            raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens.tolist()}")
        if bool((lengths > capacity).any()):
            raise _cache_too_small(lengths.tolist(), capacity, paged)
        if paged:
            _check_block_table_entries(block_table, lengths, k_cache)
    return cache_seqlens, capacity


def _cache_too_small(lengths: int | list[int], capacity: int, paged: bool) -> ValueError:
    return ValueError(
        f"the cache is too small: cache_seqlens + seqlen_new = {lengths} exceeds its capacity of {capacity} tokens"
        + (" (max_blocks * page_size)" if paged else " (seqlen_cache)")
    )


def _check_block_table_entries(block_table: Tensor, lengths: Tensor, k_cache: Tensor) -> None:
    """The pages holding each row's first ``lengths[b]`` positions must exist; later entries are not read."""
    page_size = k_cache.shape[1]
    pages_used = (lengths + page_size - 1) // page_size  # [B]
    used = torch.arange(block_table.shape[1], device=block_table.device)[None] < pages_used[:, None]
    bad = used & ((block_table < 0) | (block_table >= k_cache.shape[0]))
    if bool(bad.any()):
        raise ValueError(
            f"block_table entries in use must be in [0, num_blocks = {k_cache.shape[0]}), got "
            f"{block_table[bad].tolist()[:8]}"
        )


def sigmoid_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    *,
    cache_seqlens: Tensor | int | None = None,
    block_table: Tensor | None = None,
    bias: float | Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    softmax_scale: float | None = None,
) -> Tensor:
    """Sigmoid attention of new queries against a KV cache (decode and chunked prefill), flash-attn style.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k_cache, v_cache: (batch, seqlen_cache, nheads_k, headdim), or with ``block_table`` a paged cache
            (num_blocks, page_size, nheads_k, headdim); v_cache's head dim (headdim_v) may differ.
        k, v: optional (batch, seqlen_new, nheads_k, headdim) and (..., headdim_v). They are first written
            into the caches, in place, at positions ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1`` of row b.
        cache_seqlens: int or int32 (batch,): the number of tokens already in each row's cache. None means
            every row's cache is full (seqlen_cache, or max_blocks * page_size); then k, v cannot be given.
            It is not updated: the caller advances it.
        block_table: int32 (batch, max_blocks): row b's position p lives in page
            ``block_table[b, p // page_size]`` at offset ``p % page_size``. Entries past a row's last
            page are not read.
        bias: as in ``sigmoid_attn_func``; None means ``-log(Sk_b)`` with Sk_b = cache_seqlens[b] +
            seqlen_new, each row's number of keys. Pass the training constant to match training.
        Other options as in ``sigmoid_attn_func``, with Sk = Sk_b per row (so ``causal`` lets the new
        queries see the cache and the new keys up to their own position).

    Only q and a bias tensor may require grad: this is an inference function (the Triton kernels compute
    no gradient, so such calls run on the 'torch' backend). The values of cache_seqlens and block_table
    are checked on the CPU; on a GPU only with SIGATTN_CHECK_VALUES=1 (reading them would synchronise with
    the device on every call), never under CUDA-graph capture or torch.compile. An int cache_seqlens, a
    host value, is checked everywhere.

    Returns:
        (batch, seqlen_q, nheads, headdim_v), in the dtype of q.
    """
    cache_seqlens, capacity = _check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table)
    longest = max(q.shape[1], capacity)
    window = _check_options(q, bias, window_size, alibi_slopes, causal, deterministic, q.shape[0], longest)
    num_new = 0 if k is None else k.shape[1]
    # None: every row holds the whole cache (no lengths tensor to build on each decode step).
    seqlens_k = None if cache_seqlens is None else cache_seqlens + num_new
    scale = _resolve_scale(scale, q.shape[-1], softmax_scale)
    call = AttnCall(
        "kvcache",
        q,
        k_cache,
        v_cache,
        scale,
        bias,
        Mask(causal, window),
        alibi_slopes,
        deterministic,
        seqlens_k=seqlens_k,
        block_table=block_table,
    )
    # Every check, the backend's included, comes before the append: a call that raises leaves the cache as
    # it was (but for kernels that fail to build for it under a forced "triton": see backends.dispatch).
    backend = select_backend(call)
    if k is not None:
        append_kv(k_cache, v_cache, k, v, cache_seqlens, block_table)
    return dispatch(call, backend)


def scaled_dot_product_sigmoid_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    bias: float | Tensor | None = None,
) -> Tensor:
    """Sigmoid attention with ``torch.nn.functional.scaled_dot_product_attention``'s layout, conventions and
    argument order, so a call of SDPA (positional arguments included) works with the name swapped.

    Args:
        query: (batch, nheads, seqlen_q, headdim).
        key, value: (batch, nheads_k, seqlen_k, headdim) and (..., headdim_v) (SDPA's Ev may differ from E);
            nheads_k must equal nheads unless ``enable_gqa=True``, which allows nheads to be a multiple of
            nheads_k.
        attn_mask: broadcastable to (batch, nheads, seqlen_q, seqlen_k). Boolean: True marks the keys a
            query may attend to (others contribute exactly 0). Floating point: added to the logits
            (a -inf entry makes that weight 0), and receives a gradient when it requires one.
        dropout_p: attention dropout in [0, 1), as SDPA's (pass 0 in evaluation, as nanoGPT does): each
            weight is zeroed with probability dropout_p and the others scaled by 1 / (1 - dropout_p), drawn
            as in ``sigmoid_attn_func``.
        is_causal: SDPA's causal mask, aligned to the top-left: query i sees key j iff j <= i.
            Cannot be combined with attn_mask.
        scale: default ``1 / sqrt(headdim)``.
        enable_gqa: allow fewer key/value heads than query heads (grouped-query attention).
        bias: keyword only (SDPA has no such argument): a float, a (nheads,) tensor, or None for
            ``-log(seqlen_k)``.

    Weights are ``sigmoid(scale * q_i . k_j + bias (+ float mask))``; masked keys contribute 0 and a
    query with no allowed key outputs 0 (where softmax SDPA would give NaN).

    Returns:
        (batch, nheads, seqlen_q, headdim_v), in the dtype of query.
    """
    for t, n in ((query, "query"), (key, "key"), (value, "value")):
        validation.check_tensor(t, n, 4, "(batch, nheads, seqlen, headdim)")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    validation.check_qkv(q, k, v, ("query", "key", "value"), ("(B, Hq, Sq, D)", "(B, Hkv, Sk, D|Dv)"))
    validation.check_dropout_p(dropout_p)
    validation.check_flag(enable_gqa, "enable_gqa")
    validation.check_flag(is_causal, "is_causal")
    if not enable_gqa and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"query has {q.shape[2]} heads and key {k.shape[2]}: pass enable_gqa=True for grouped-query attention"
        )
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal cannot both be set: fold the causal mask into attn_mask")
    batch, seqlen_q, num_heads, _ = q.shape
    validation.check_attn_mask(attn_mask, (batch, num_heads, seqlen_q, k.shape[1]), query)
    if attn_mask is not None and attn_mask.dim() < 4:
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    _check_options(q, bias, (-1, -1), None, is_causal, False, batch, max(seqlen_q, k.shape[1]))
    mask = Mask(is_causal, top_left=True)
    scale = _resolve_scale(scale, q.shape[-1])
    dropout = _dropout(dropout_p, q)
    call = AttnCall("dense", q, k, v, scale, bias, mask, None, False, attn_mask=attn_mask, dropout=dropout)
    return dispatch(call).transpose(1, 2)
