"""The specification of sigmoid attention, in plain PyTorch.

Every backend computes exactly what this module computes; tests compare against it.
It materialises the (Sq, Sk) score matrix, so it is for small inputs and tests only.

Layout is flash-attn's: q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D), out (B, Sq, Hq, D).

    logit[b, h, i, j] = scale * q[b, i, h] . k[b, j, h // G] + bias[b, h] - slope[b, h] * |i + off_b - j|
    out[b, i, h]      = sum over allowed j of sigmoid(logit[b, h, i, j]) * v[b, j, h // G]

with G = Hq // Hkv, off_b = Sk_b - Sq (bottom-right alignment, flash-attn) or 0 (top-left, SDPA's
``is_causal``), and Sk_b the number of valid keys of batch row b (``seqlens_k``, default Sk). Key j is
allowed for query i iff j < Sk_b and

    off_b + i - left <= j <= off_b + i + right      (a bound of -1 is unbounded; causal sets right = 0)

and, for an SDPA ``attn_mask``, the boolean mask is True or the float mask is not -inf (a float mask is
added to the logits). Masked keys contribute exactly 0, so a query with no allowed key outputs 0.
``bias=None`` means ``-log(Sk_b)`` (see README.md for why). With attention dropout of probability p, the
weight sigmoid(logit[b, h, i, j]) is multiplied by 1 / (1 - p) where ``dropout.keep_mask`` keeps it and by 0
elsewhere (a counter-based draw from the call's seed and (b, h, i, j) alone: ``dropout.py``).

Non-finite values. What no query may look at never reaches any output or gradient: cache slots past
``Sk_b`` (unused pages included), keys that every query of a head masks (padding, a boolean mask column of
False, keys outside every window), and the query and output-gradient rows of queries with no allowed key.
Their gradients are 0. A NaN or inf in a key or value that some query of the head may see follows the
arithmetic: its own products are NaN or inf, and, as in PyTorch's math backend and FlashAttention, it may
also reach rows that mask it, through 0 x NaN in the weight-times-value sums; which of those rows it
reaches depends on the backend's tiles. Likewise a non-finite query or output-gradient row of a query that
sees some key may reach the gradients of keys that query masks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .dropout import Dropout
from .dropout import factors as dropout_factors
from .dropout import keep_mask as dropout_keep_mask

Bias = float | Tensor | None
"""A float, a per-head (Hq,) tensor, or None: -log(Sk_b) of each batch row's own key count."""


def resolve_bias(bias: Bias, seqlen_k: int) -> Bias:
    """The bias of a call whose every row has ``seqlen_k`` keys: None becomes the float -log(seqlen_k) (0.0
    without keys, whose rows output 0), so that no backend or kernel derives it again; a float or a tensor
    is the bias. (Packed sequences and caches of per-row lengths keep None: each row has its own.)"""
    if bias is None:
        return -math.log(seqlen_k) if seqlen_k > 0 else 0.0
    return bias if isinstance(bias, Tensor) else float(bias)


class Mask(NamedTuple):
    """Which keys each query may attend to (module docstring), as every backend and kernel reads it.

    ``causal`` and ``window`` = (left, right) as the public functions take them (a bound of -1 is
    unbounded; validated, so a bound that reaches past every key is -1); ``top_left`` aligns the diagonal at
    the top-left corner (SDPA's ``is_causal``) instead of the bottom-right (flash-attn). (A named tuple, as
    are the kernels' ``Params`` and ``Rows``: one is made on every call, and a frozen dataclass's __init__
    sets each field through object.__setattr__; host time per call: benchmarks/host_ab.py.)"""

    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    top_left: bool = False

    @property
    def bounds(self) -> tuple[int, int]:
        """(left, right): key j is allowed for the query at diagonal position d iff d - left <= j <= d + right.
        The one place where ``causal`` becomes the window's right bound, 0."""
        left, right = self.window
        return left, 0 if self.causal else right

    @property
    def full(self) -> bool:
        """No bound: every key is allowed."""
        return self.bounds == (-1, -1)

    @property
    def causal_only(self) -> bool:
        """Exactly a causal mask: keys up to the diagonal, with no left bound."""
        return self.bounds == (-1, 0)


UNMASKED = Mask()


def key_offsets(seqlen_q: int, seqlens_k: Tensor, top_left: bool) -> Tensor:
    """Per-row diagonal offset off_b: query i sits at key position i + off_b. Shape (B,) int64."""
    if top_left:
        return torch.zeros_like(seqlens_k)
    return seqlens_k - seqlen_q


def allowed_keys(
    seqlen_q: int,
    seqlen_k: int,
    seqlens_k: Tensor,
    mask: Mask,
    *,
    rows: Tensor | None = None,
    cols: Tensor | None = None,
) -> Tensor:
    """Boolean mask of the keys each query may attend to, broadcastable to (B, 1, len(rows), len(cols)) (its
    query dim is 1 when no window or causal mask makes it depend on the query).

    ``rows``/``cols`` select a block of query/key positions (default: all), so the blocked backend
    builds the same mask tile by tile.
    """
    device = seqlens_k.device
    rows = torch.arange(seqlen_q, device=device) if rows is None else rows
    cols = torch.arange(seqlen_k, device=device) if cols is None else cols
    seqlens_k = seqlens_k.long()
    off = key_offsets(seqlen_q, seqlens_k, mask.top_left)[:, None, None]  # [B, 1, 1]
    diag = rows[None, :, None] + off  # [B, BQ, 1]: the key position aligned with each query
    j = cols[None, None, :]  # [1, 1, BK]
    return in_window(j < seqlens_k[:, None, None], j, diag, mask)[:, None]


def in_window(ok: Tensor, j: Tensor, diag: Tensor, mask: Mask) -> Tensor:
    """``ok`` and key position j within the window of the query aligned with key position ``diag``:
    diag - left <= j <= diag + right (``Mask.bounds``)."""
    left, right = mask.bounds
    if left >= 0:
        ok = ok & (j >= diag - left)
    if right >= 0:
        ok = ok & (j <= diag + right)
    return ok


def default_bias(seqlens_k: Tensor) -> Tensor:
    """-log(Sk_b) per batch row, (B,) float64; 0 for a row with no keys (it outputs 0 anyway)."""
    n = seqlens_k.double()
    return torch.where(n > 0, -torch.log(n.clamp(min=1)), torch.zeros_like(n))


def logit_bias(bias: Bias, seqlens_k: Tensor, num_heads: int) -> Tensor:
    """The additive bias as a (B or 1, Hq) tensor: the float, the per-head tensor or -log(Sk_b)."""
    if bias is None:
        return default_bias(seqlens_k)[:, None]
    if isinstance(bias, Tensor):
        return bias.reshape(1, num_heads)
    return torch.tensor([[float(bias)]], dtype=torch.float64, device=seqlens_k.device)


def alibi_distance_bias(
    alibi_slopes: Tensor, seqlen_q: int, seqlens_k: Tensor, *, top_left: bool, rows: Tensor, cols: Tensor
) -> Tensor:
    """-slope * |i + off_b - j| as (B or 1, Hq, len(rows), len(cols))."""
    off = key_offsets(seqlen_q, seqlens_k.long(), top_left)[:, None, None, None]
    dist = (rows[None, None, :, None] + off - cols[None, None, None, :]).abs()
    slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]
    return -slopes[:, :, None, None] * dist


def sigmoid_attn_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    bias: Bias = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: Tensor | None = None,
    seqlens_k: Tensor | None = None,
    top_left: bool = False,
    attn_mask: Tensor | None = None,
    dropout: Dropout | None = None,
    upcast: bool = True,
) -> Tensor:
    """Sigmoid attention by materialising the scores, with the public functions' arguments (``causal``,
    ``window_size``; ``top_left``: SDPA's alignment); ``masked_reference`` with their ``Mask``.
    ``dropout``: the weights ``dropout.keep_mask`` drops are zeroed, the others scaled by 1 / (1 - p).

    ``upcast=True`` computes in float64 and returns float64 (the truth); ``upcast=False`` computes
    in the inputs' precision and returns their dtype (the baseline error of PyTorch in that precision).
    ``attn_mask`` is SDPA's: (B or 1, Hq or 1, Sq, Sk), boolean (True = allowed) or float (added).
    """
    mask = Mask(causal, tuple(window_size), top_left)
    return masked_reference(
        q,
        k,
        v,
        scale=scale,
        bias=bias,
        mask=mask,
        alibi_slopes=alibi_slopes,
        seqlens_k=seqlens_k,
        attn_mask=attn_mask,
        dropout=dropout,
        upcast=upcast,
    )


def masked_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None,
    bias: Bias,
    mask: Mask,
    alibi_slopes: Tensor | None = None,
    seqlens_k: Tensor | None = None,
    attn_mask: Tensor | None = None,
    dropout: Dropout | None = None,
    upcast: bool = True,
) -> Tensor:
    """``sigmoid_attn_reference`` of one ``Mask``: the form the backends hand on."""
    top_left = mask.top_left
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    dtype = torch.float64 if upcast else q.dtype
    if seqlens_k is None:
        seqlens_k = torch.full((batch,), seqlen_k, device=q.device, dtype=torch.int64)
    allowed = allowed_keys(seqlen_q, seqlen_k, seqlens_k, mask)  # [B, 1, Sq, Sk]
    if attn_mask is not None:
        allowed = allowed & (attn_mask if attn_mask.dtype == torch.bool else attn_mask != -math.inf)
    terms = logit_bias(bias, seqlens_k, num_heads).to(dtype)[:, :, None, None]  # [B or 1, Hq, 1, 1]
    if alibi_slopes is not None:
        # The float32 slopes times the distance in float64 when upcasting: in float32 the product
        # rounds (about 1e-7 relative), which is no longer the truth.
        slopes = alibi_slopes.double() if upcast else alibi_slopes
        rows = torch.arange(seqlen_q, device=q.device)
        cols = torch.arange(seqlen_k, device=q.device)
        terms = terms + alibi_distance_bias(slopes, seqlen_q, seqlens_k, top_left=top_left, rows=rows, cols=cols)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        terms = terms + attn_mask.to(dtype)
    weights = None
    if dropout is not None:
        keep = dropout_keep_mask(dropout, batch, num_heads, seqlen_q, seqlen_k)
        weights = dropout_factors(dropout, keep, dtype)
    out = attend(q.to(dtype), k.to(dtype), v.to(dtype), scale, terms.to(dtype), allowed, weights)
    return out if upcast else out.to(q.dtype)


def attend(
    q: Tensor, k: Tensor, v: Tensor, scale: float, terms: Tensor, allowed: Tensor, weights: Tensor | None = None
) -> Tensor:
    """sum over allowed j of sigmoid(scale q_i . k_j + terms) w_ij v_j, in the dtype of q: q (B, Sq, Hq, D), k
    and v (B, Sk, Hkv, D); ``terms`` (the additive logit terms), ``allowed`` and the weights ``w`` (dropout's
    factors; None: 1) broadcast to (B, Hq, Sq, Sk).

    What no query may look at is zeroed before any product (module docstring): the keys no query of a head
    sees, and the queries (and, through the output, the output gradients) of rows that see no key."""
    group = q.shape[2] // k.shape[2]
    key_seen = allowed.any(dim=2).transpose(1, 2)[..., None]  # [B, Sk, Hq or 1, 1]
    query_sees = allowed.any(dim=3).transpose(1, 2)[..., None]  # [B, Sq, Hq or 1, 1]
    q = q.where(query_sees, 0)
    k = k.repeat_interleave(group, dim=2).where(key_seen, 0)
    v = v.repeat_interleave(group, dim=2).where(key_seen, 0)
    logits = torch.einsum("bihd,bjhd->bhij", q * scale, k) + terms  # [B, Hq, Sq, Sk]
    # Masked before the sigmoid, so that their gradient is exactly 0 even where a logit is NaN.
    probs = torch.sigmoid(logits.masked_fill(~allowed, -math.inf))
    if weights is not None:
        probs = probs * weights
    return torch.einsum("bhij,bjhd->bihd", probs, v).where(query_sees, 0)


def sigmoid_attn_varlen_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    alibi_slopes: Tensor | None = None,
    dense=sigmoid_attn_reference,
    **options,
) -> Tensor:
    """Packed sequences: q (total_q, Hq, D), k and v (total_k, Hkv, D). Each sequence is attended
    on its own, exactly as ``dense`` on a batch of one; so the default bias is -log(its key length).
    ``dense`` lets the memory-efficient backend reuse this definition with its own dense function."""
    starts_q = cu_seqlens_q.tolist()
    starts_k = cu_seqlens_k.tolist()
    dropout = options.pop("dropout", None)
    outs = []
    for b in range(len(starts_q) - 1):
        qs = q[starts_q[b] : starts_q[b + 1]][None]
        ks = k[starts_k[b] : starts_k[b + 1]][None]
        vs = v[starts_k[b] : starts_k[b + 1]][None]
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        if dropout is not None:  # sequence b's weights, as the kernels draw them: b is its batch row
            options["dropout"] = dropout._replace(first_batch=b)
        outs.append(dense(qs, ks, vs, alibi_slopes=slopes, **options)[0])
    if not outs:  # no sequence: an empty output that autograd still connects to the inputs
        return dense(q[None, :0], k[None, :0], v[None, :0], **options)[0]
    return torch.cat(outs, dim=0)


def gather_paged_cache(cache: Tensor, block_table: Tensor) -> Tensor:
    """A paged cache (num_blocks, page_size, Hkv, D) read through block_table (B, max_blocks) as a
    contiguous (B, max_blocks * page_size, Hkv, D) cache."""
    batch, max_blocks = block_table.shape
    if cache.shape[0] == 0:  # no page at all: every row is empty, and there is nothing to gather
        return cache.new_zeros(batch, max_blocks * cache.shape[1], *cache.shape[2:])
    # Entries past a row's last page are padding (often -1); what they read is masked out.
    pages = cache[block_table.long().clamp(0, cache.shape[0] - 1)]  # [B, max_blocks, page_size, Hkv, D]
    return pages.reshape(batch, max_blocks * cache.shape[1], *cache.shape[2:])


def sigmoid_attn_kvcache_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor | None,
    *,
    block_table: Tensor | None = None,
    dense=sigmoid_attn_reference,
    **options,
) -> Tensor:
    """Attention of q (B, Sq, Hq, D) to the first ``seqlens_k[b]`` keys (None: all) of each row's cache,
    bottom-right aligned per row. The cache is (B, S_cache, Hkv, D), or paged (num_blocks, page_size, Hkv, D) with
    ``block_table``."""
    if block_table is not None:
        k_cache = gather_paged_cache(k_cache, block_table)
        v_cache = gather_paged_cache(v_cache, block_table)
    return dense(q, k_cache, v_cache, seqlens_k=seqlens_k, **options)
