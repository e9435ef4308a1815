"""Memory-efficient sigmoid attention in plain PyTorch, for the CPU and any device without a kernel.

It walks (query block, key block) tiles and never holds more than one tile of scores, so memory grows
with S * D, not S^2. The backward recomputes each tile's probabilities from q and k: sigmoid needs no
saved row statistics (no LSE), and dS = dP * P * (1 - P) needs nothing from the forward but P itself.
Half-precision inputs are computed in float32; float32 and float64 in their own precision.
Semantics are exactly those of ``reference.sigmoid_attn_reference``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .dropout import Dropout, factors, keep_mask
from .reference import UNMASKED, Bias, Mask, allowed_keys, default_bias, key_offsets

# Scores held at once, in elements (16 MiB of float32): large tiles amortise the Python loop, small
# enough that B * H * BQ * BK stays far below the S^2 the path exists to avoid.
_TILE_BUDGET = 1 << 22
_MIN_BLOCK, _MAX_BLOCK = 16, 1024


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which an ambient torch.autocast of ``device`` is off: it would run the products in 16 bits
    (in the backward too, when that is called inside it), where the PyTorch backends compute in float32
    (float64 inputs in float64), as the kernels compute whatever the context."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def block_size(batch_heads: int) -> int:
    """Square tile side: the largest power of two whose tile over all batch rows and heads fits the budget."""
    side = int(math.sqrt(_TILE_BUDGET / max(batch_heads, 1)))
    side = 1 << max(side.bit_length() - 1, 0)
    return min(max(side, _MIN_BLOCK), _MAX_BLOCK)


@dataclass(frozen=True)
class _Options:
    scale: float
    bias: float | None  # the bias unless it is a (Hq,) tensor (the autograd input head_bias); None: -log(Sk_b)
    mask: Mask
    block: int
    dropout: Dropout | None = None


class _Tiles:
    """q, k, v in head-major compute layout plus everything needed to rebuild any tile's probabilities.

    Shapes: q (B, Hkv, G, Sq, D); k, v (B, Hkv, 1, Sk, D), so one K/V tile serves a whole GQA group.
    """

    def __init__(self, q, k, v, head_bias, attn_mask, alibi_slopes, seqlens_k, opts: _Options):
        batch, seqlen_q, num_heads, head_dim = q.shape
        seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
        self.group = num_heads // num_kv_heads
        self.seqlen_q, self.seqlen_k, self.num_heads = seqlen_q, seqlen_k, num_heads
        self.opts = opts
        self.dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        hkv, g = num_kv_heads, self.group
        self.q = q.transpose(1, 2).to(self.dtype).reshape(batch, hkv, g, seqlen_q, head_dim)
        self.k = k.transpose(1, 2).to(self.dtype)[:, :, None]
        self.v = v.transpose(1, 2).to(self.dtype)[:, :, None]
        self.seqlens_k = seqlens_k
        # Cache slots past a row's length may hold anything, NaN included: they are masked, and ``operands``
        # zeroes them in the tiles that hold them.
        self.lengths = (
            seqlens_k.long()
            if seqlens_k is not None
            else torch.full((batch,), seqlen_k, dtype=torch.long, device=q.device)
        )

        bias_rows = torch.zeros(1, num_heads, dtype=self.dtype, device=q.device)
        if head_bias is not None:
            bias_rows = bias_rows + head_bias.to(self.dtype)[None]
        elif opts.bias is not None:
            bias_rows = bias_rows + opts.bias
        else:
            bias_rows = bias_rows + default_bias(self.lengths).to(self.dtype)[:, None]
        # Leading sizes spelled out: with no query head (g = 0) a -1 would be ambiguous.
        self.bias = bias_rows.reshape(bias_rows.shape[0], hkv, g, 1, 1)

        self.alibi = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]
            self.alibi = slopes.to(self.dtype).reshape(slopes.shape[0], hkv, g, 1, 1)
        self.offsets = key_offsets(seqlen_q, self.lengths, opts.mask.top_left).to(self.dtype)[:, None, None, None, None]

        self.attn_mask = None
        if attn_mask is not None:
            self.attn_mask = attn_mask.expand(batch, num_heads, seqlen_q, seqlen_k)
        self.needs_mask = not opts.mask.full or seqlens_k is not None or attn_mask is not None

    def mask_tile(self, rows: slice, cols: slice) -> Tensor | None | bool:
        """Boolean (B or 1, Hkv or 1, G or 1, BQ, BK) allowed mask; None if all allowed; False if none is."""
        if not self.needs_mask:
            return None
        device = self.q.device
        mask = allowed_keys(
            self.seqlen_q,
            self.seqlen_k,
            self.lengths,
            self.opts.mask,
            rows=torch.arange(rows.start, rows.stop, device=device),
            cols=torch.arange(cols.start, cols.stop, device=device),
        )[:, :, None]
        if self.attn_mask is not None:
            block = self._mask_block(rows, cols)
            mask = mask & (block if block.dtype == torch.bool else block != -math.inf)
        if not bool(mask.any()):
            return False
        return None if bool(mask.all()) else mask

    def _mask_block(self, rows: slice, cols: slice) -> Tensor:
        block = self.attn_mask[:, :, rows, cols]
        return block.reshape(block.shape[0], -1, self.group, *block.shape[2:])

    def operands(self, rows: slice, cols: slice, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of one tile. Where only some pairs are allowed, the queries that see no key of the tile and
        the keys that no query of the tile sees are zeroed, as the reference zeroes what no query may look
        at: a NaN there cannot reach the tile's products through 0 x NaN."""
        q, k, v = self.q[..., rows, :], self.k[..., cols, :], self.v[..., cols, :]
        if mask is None:
            return q, k, v
        key_seen = self.key_seen(mask)
        return q.where(self.query_sees(mask), 0), k.where(key_seen, 0), v.where(key_seen, 0)

    @staticmethod
    def query_sees(mask: Tensor) -> Tensor:
        """(B, Hkv or 1, G or 1, BQ, 1): the tile's queries that see one of its keys."""
        return mask.any(dim=-1, keepdim=True)

    @staticmethod
    def key_seen(mask: Tensor) -> Tensor:
        """(B, Hkv or 1, 1, BK, 1): the tile's keys that a query of the tile (of any head of the group) sees."""
        return mask.any(dim=-2, keepdim=True).any(dim=2, keepdim=True).transpose(-1, -2)

    def probs(self, q: Tensor, k: Tensor, rows: slice, cols: slice, mask: Tensor | None) -> Tensor:
        """sigmoid(logits) of one tile, (B, Hkv, G, BQ, BK), from its ``operands``; exactly 0 where masked."""
        logits = q @ k.transpose(-1, -2)
        logits = logits * self.opts.scale + self.bias
        if self.alibi is not None:
            i = torch.arange(rows.start, rows.stop, device=self.q.device, dtype=self.dtype)
            j = torch.arange(cols.start, cols.stop, device=self.q.device, dtype=self.dtype)
            logits = logits - self.alibi * (i[:, None] + self.offsets - j[None, :]).abs()
        if self.attn_mask is not None and self.attn_mask.dtype != torch.bool:
            logits = logits + self._mask_block(rows, cols).to(self.dtype)
        p = torch.sigmoid(logits)
        return p if mask is None else p.where(mask, 0)

    def weights(self, rows: slice, cols: slice) -> Tensor | None:
        """Dropout's factor of each weight of one tile, (B, Hkv, G, BQ, BK); None without dropout."""
        dropout = self.opts.dropout
        if dropout is None:
            return None
        device = self.q.device
        batch, hkv, g = self.q.shape[:3]
        keep = keep_mask(
            dropout,
            batch,
            self.num_heads,
            self.seqlen_q,
            self.seqlen_k,
            rows=torch.arange(rows.start, rows.stop, device=device),
            cols=torch.arange(cols.start, cols.stop, device=device),
        )
        return factors(dropout, keep, self.dtype).reshape(batch, hkv, g, *keep.shape[2:])

    def tiles(self):
        """(rows, cols, mask) for every tile with at least one allowed key."""
        b = self.opts.block
        for i0 in range(0, self.seqlen_q, b):
            rows = slice(i0, min(i0 + b, self.seqlen_q))
            for j0 in range(0, self.seqlen_k, b):
                cols = slice(j0, min(j0 + b, self.seqlen_k))
                mask = self.mask_tile(rows, cols)
                if mask is not False:
                    yield rows, cols, mask


class _BlockedSigmoidAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, head_bias, attn_mask, alibi_slopes, seqlens_k, opts: _Options):
        tiles = _Tiles(q, k, v, head_bias, attn_mask, alibi_slopes, seqlens_k, opts)
        out = tiles.q.new_zeros((*tiles.q.shape[:-1], v.shape[-1]))  # v's head dim: the output's
        for rows, cols, mask in tiles.tiles():
            q_i, k_j, v_j = tiles.operands(rows, cols, mask)
            p = tiles.probs(q_i, k_j, rows, cols, mask)
            weights = tiles.weights(rows, cols)
            o_i = (p if weights is None else p * weights) @ v_j
            out[..., rows, :] += o_i if mask is None else o_i.where(tiles.query_sees(mask), 0)
        ctx.save_for_backward(q, k, v, head_bias, attn_mask, alibi_slopes, seqlens_k)
        ctx.opts = opts
        batch, seqlen_q, num_heads, _ = q.shape
        return out.reshape(batch, num_heads, seqlen_q, v.shape[-1]).transpose(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        with without_autocast(grad_out.device):
            return _BlockedSigmoidAttn._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        q, k, v, head_bias, attn_mask, alibi_slopes, seqlens_k = ctx.saved_tensors
        opts = ctx.opts
        tiles = _Tiles(q, k, v, head_bias, attn_mask, alibi_slopes, seqlens_k, opts)
        batch, seqlen_q, num_heads, head_dim = q.shape
        do = grad_out.transpose(1, 2).to(tiles.dtype).reshape(*tiles.q.shape[:-1], v.shape[-1])
        dq = torch.zeros_like(tiles.q)
        dk = torch.zeros_like(tiles.k[:, :, 0])
        dv = torch.zeros_like(tiles.v[:, :, 0])
        want_bias = head_bias is not None and ctx.needs_input_grad[3]
        want_mask = attn_mask is not None and ctx.needs_input_grad[4]
        dbias = torch.zeros(tiles.q.shape[1:3], dtype=tiles.dtype, device=q.device) if want_bias else None
        dmask = torch.zeros_like(attn_mask, dtype=tiles.dtype) if want_mask else None

        for rows, cols, mask in tiles.tiles():
            q_i, k_j, v_j = tiles.operands(rows, cols, mask)
            do_i = do[..., rows, :]
            if mask is not None:
                do_i = do_i.where(tiles.query_sees(mask), 0)
            p = tiles.probs(q_i, k_j, rows, cols, mask)  # [B, Hkv, G, BQ, BK]
            dp = do_i @ v_j.transpose(-1, -2)
            weights = tiles.weights(rows, cols)
            if weights is not None:  # the output reads P x weights: dV takes that product, dP its weights
                dp = dp * weights
            ds = dp * p * (1 - p)
            if mask is not None:
                ds = ds.where(mask, 0)
            dq_i = ds @ k_j
            dk_j = torch.einsum("bhgij,bhgid->bhjd", ds, q_i)
            dv_j = torch.einsum("bhgij,bhgid->bhjd", p if weights is None else p * weights, do_i)
            if mask is not None:
                # The rows and keys that see nothing in the tile get exactly 0 from it (0 x NaN is not 0).
                key_seen = tiles.key_seen(mask)[:, :, 0]
                dq_i = dq_i.where(tiles.query_sees(mask), 0)
                dk_j, dv_j = dk_j.where(key_seen, 0), dv_j.where(key_seen, 0)
            dq[..., rows, :] += dq_i * opts.scale
            dk[..., cols, :] += dk_j * opts.scale
            dv[..., cols, :] += dv_j
            if dbias is not None:
                dbias += ds.sum(dim=(0, 3, 4))
            if dmask is not None:
                ds_heads = ds.reshape(batch, num_heads, *ds.shape[3:])
                # Sum over every dim the mask broadcasts along, Sq and Sk included ((1, Sk) masks).
                reduce = [d for d in range(4) if attn_mask.shape[d] == 1]
                mask_rows = rows if attn_mask.shape[2] != 1 else slice(None)
                mask_cols = cols if attn_mask.shape[3] != 1 else slice(None)
                dmask[..., mask_rows, mask_cols] += ds_heads.sum(dim=reduce, keepdim=True) if reduce else ds_heads

        dq = dq.reshape(batch, num_heads, seqlen_q, head_dim).transpose(1, 2).to(q.dtype)
        dk = dk.transpose(1, 2).to(k.dtype)
        dv = dv.transpose(1, 2).to(v.dtype)
        dbias = dbias.reshape(num_heads).to(head_bias.dtype) if dbias is not None else None
        dmask = dmask.to(attn_mask.dtype) if dmask is not None else None
        return dq, dk, dv, dbias, dmask, None, None, None


def sigmoid_attn_blocked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    bias: Bias = None,
    mask: Mask = UNMASKED,
    alibi_slopes: Tensor | None = None,
    seqlens_k: Tensor | None = None,
    attn_mask: Tensor | None = None,
    dropout: Dropout | None = None,
    block: int | None = None,
) -> Tensor:
    """Same arguments and result as ``masked_reference(..., upcast=False)``, in O(S * D) memory.

    ``block`` overrides the tile side (tests use it to force many tiles on small inputs)."""
    batch, _, num_heads, head_dim = q.shape
    opts = _Options(
        scale=1.0 / math.sqrt(head_dim) if scale is None else float(scale),
        bias=None if isinstance(bias, Tensor) else bias,
        mask=mask,
        block=block or block_size(batch * num_heads),
        dropout=dropout,
    )
    head_bias = bias if isinstance(bias, Tensor) else None
    return _BlockedSigmoidAttn.apply(q, k, v, head_bias, attn_mask, alibi_slopes, seqlens_k, opts)
