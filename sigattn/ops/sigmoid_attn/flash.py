"""Autograd and ``torch.library`` ops over the kernels (``kernels.py``): what the ``triton`` backend calls.

Eagerly a call goes through ``_FlashEager`` (an autograd function: no custom-op dispatch); under
``torch.compile`` through the ops ``sigattn::flash_fwd`` and friends, which torch.compile traces as
opaque nodes with their fake implementations. Both run the same entry points, ``kernels.forward``,
``kernels.backward`` and ``kernels.decode``, which choose the kernel of each direction.

The ops take a call's options as scalars (``_op_options``): the bias as the tensor argument ``head_bias``
when it is a per-head tensor, else as ``const_bias`` (a float, or None for -log of each row's key count),
the mask's fields as they are, and dropout as its probability (0: none) and seed tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .dropout import Dropout
from .params import Params, Rows
from .reference import Bias, Mask


def _split(bias: Bias) -> tuple[Tensor | None, float | None]:
    """(head_bias, const_bias): the bias as the ops and ``_FlashEager`` take it."""
    return (bias, None) if isinstance(bias, Tensor) else (None, bias)


def _op_options(params: Params) -> tuple:
    """(scale, causal, window_left, window_right, top_left, deterministic, dropout_p, dropout_seed): the ops'
    other arguments."""
    mask, dropout = params.mask, params.dropout
    dropout_options = (dropout.p, dropout.seed) if dropout is not None else (0.0, None)
    return params.scale, mask.causal, *mask.window, mask.top_left, params.deterministic, *dropout_options


def _from_op_options(
    head_bias, const_bias, scale, causal, left, right, top_left, deterministic, dropout_p, dropout_seed
) -> tuple[Params, Bias]:
    mask = Mask(bool(causal), (int(left), int(right)), bool(top_left))
    dropout = Dropout(float(dropout_p), dropout_seed) if dropout_p > 0 else None
    params = Params(float(scale), mask, bool(deterministic), dropout)
    return params, head_bias if head_bias is not None else const_bias


def _no_bias_grad(q: Tensor) -> Tensor:
    # custom ops cannot return None: an empty tensor stands for "no bias gradient".
    return q.new_empty(0, dtype=torch.float32)


def _fake_grads(q: Tensor, k: Tensor, v: Tensor, head_bias: Tensor | None) -> tuple[Tensor, ...]:
    dbias = torch.empty_like(head_bias) if head_bias is not None else _no_bias_grad(q)
    return (*(kernels.empty_like(t) for t in (q, k, v)), dbias)


@torch.library.custom_op("sigattn::flash_fwd", mutates_args=())
def _flash_fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_bias: Tensor | None,
    alibi: Tensor | None,
    const_bias: float | None,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    top_left: bool,
    deterministic: bool,
    dropout_p: float,
    dropout_seed: Tensor | None,
) -> Tensor:
    params, bias = _from_op_options(
        head_bias,
        const_bias,
        scale,
        causal,
        window_left,
        window_right,
        top_left,
        deterministic,
        dropout_p,
        dropout_seed,
    )
    return kernels.forward(q, k, v, params, bias, alibi)


@_flash_fwd_op.register_fake
def _(q, k, v, head_bias, alibi, *options):
    return kernels.empty_out(q, v)


@torch.library.custom_op("sigattn::flash_bwd", mutates_args=())
def _flash_bwd_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_bias: Tensor | None,
    alibi: Tensor | None,
    const_bias: float | None,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    top_left: bool,
    deterministic: bool,
    dropout_p: float,
    dropout_seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    params, bias = _from_op_options(
        head_bias,
        const_bias,
        scale,
        causal,
        window_left,
        window_right,
        top_left,
        deterministic,
        dropout_p,
        dropout_seed,
    )
    dq, dk, dv, dbias = kernels.backward(do, q, k, v, params, bias, alibi)
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
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    head_bias: Tensor | None,
    alibi: Tensor | None,
    const_bias: float | None,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    top_left: bool,
    deterministic: bool,
    dropout_p: float,
    dropout_seed: Tensor | None,
) -> Tensor:
    params, bias = _from_op_options(
        head_bias,
        const_bias,
        scale,
        causal,
        window_left,
        window_right,
        top_left,
        deterministic,
        dropout_p,
        dropout_seed,
    )
    rows = Rows.packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return kernels.forward(q, k, v, params, bias, alibi, rows)


@_flash_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, head_bias, alibi, *options):
    return kernels.empty_out(q, v)


@torch.library.custom_op("sigattn::flash_varlen_bwd", mutates_args=())
def _flash_varlen_bwd_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    head_bias: Tensor | None,
    alibi: Tensor | None,
    const_bias: float | None,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    top_left: bool,
    deterministic: bool,
    dropout_p: float,
    dropout_seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    params, bias = _from_op_options(
        head_bias,
        const_bias,
        scale,
        causal,
        window_left,
        window_right,
        top_left,
        deterministic,
        dropout_p,
        dropout_seed,
    )
    rows = Rows.packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq, dk, dv, dbias = kernels.backward(do, q, k, v, params, bias, alibi, rows)
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
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor | None,
    block_table: Tensor | None,
    head_bias: Tensor | None,
    alibi: Tensor | None,
    const_bias: float | None,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    top_left: bool,
    deterministic: bool,
    dropout_p: float,
    dropout_seed: Tensor | None,
) -> Tensor:
    params, bias = _from_op_options(
        head_bias,
        const_bias,
        scale,
        causal,
        window_left,
        window_right,
        top_left,
        deterministic,
        dropout_p,
        dropout_seed,
    )
    return kernels.decode(q, k_cache, v_cache, params, bias, alibi, seqlens_k, block_table)


@_flash_kvcache_fwd_op.register_fake
def _(q, k_cache, v_cache, seqlens_k, block_table, head_bias, alibi, *options):
    return kernels.empty_out(q, v_cache)


class _FlashEager(torch.autograd.Function):
    """The eager twin of the sigattn::flash_fwd and sigattn::flash_varlen_fwd ops: the same entry points and
    backward without the custom-op dispatch, which costs more than the kernel itself at short sequences
    (public call with autograd: 353 us against 165 us for the launcher on the H100's host). The ops stay
    for torch.compile, which needs their fake implementations. ``bias`` is the float or None of a call
    whose bias is not the tensor ``head_bias``."""

    @staticmethod
    def forward(ctx, q, k, v, head_bias, alibi, bias, params, varlen):
        ctx.save_for_backward(q, k, v, head_bias, alibi, *(varlen[:2] if varlen else ()))
        ctx.bias, ctx.params, ctx.max_seqlens = bias, params, varlen[2:] if varlen else None
        rows = Rows.packed(*varlen) if varlen else None
        return kernels.forward(q, k, v, params, head_bias if head_bias is not None else bias, alibi, rows)

    @staticmethod
    def backward(ctx, do):
        q, k, v, head_bias, alibi, *cu_seqlens = ctx.saved_tensors
        rows = Rows.packed(*cu_seqlens, *ctx.max_seqlens) if ctx.max_seqlens is not None else None
        bias = head_bias if head_bias is not None else ctx.bias
        grads = kernels.backward(do, q, k, v, ctx.params, bias, alibi, rows)
        if torch.is_grad_enabled():  # create_graph=True
            grads = _NotDifferentiable.apply(*grads, do, q, k, v, head_bias)
        return *grads, None, None, None, None


class _NotDifferentiable(torch.autograd.Function):
    """The identity on the kernels' gradients (dq, dk, dv, dbias), tied to what they were computed from
    (dO, q, k, v, the bias), whose backward raises: the kernels' backward has no derivative, and its
    gradients would otherwise come out of create_graph=True with no graph, so that a loss built on them (a
    gradient penalty) would silently lose the attention's second-order term."""

    @staticmethod
    def forward(ctx, dq, dk, dv, dbias, *sources):
        return tuple(g if g is None else g.view_as(g) for g in (dq, dk, dv, dbias))

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "sigmoid attention's 'triton' backend has no double backward (its backward is not differentiable): "
            "run calls that need higher-order gradients on the 'torch' backend (sigattn.use_backend('torch'))"
        )


def sigmoid_attn_flash(q: Tensor, k: Tensor, v: Tensor, params: Params, bias: Bias, alibi: Tensor | None) -> Tensor:
    """Dense rows on the kernels, with autograd; semantics of ``reference.masked_reference``."""
    head_bias, const_bias = _split(bias)
    if not torch.compiler.is_compiling():
        return _FlashEager.apply(q, k, v, head_bias, alibi, const_bias, params, None)
    return _flash_fwd_op(q, k, v, head_bias, alibi, const_bias, *_op_options(params))


def sigmoid_attn_varlen_flash(
    q: Tensor, k: Tensor, v: Tensor, rows: Rows, params: Params, bias: Bias, alibi: Tensor | None
) -> Tensor:
    """Packed sequences (``Rows.packed``) on the kernels, with autograd; semantics of
    ``reference.sigmoid_attn_varlen_reference``."""
    varlen = (rows.cu_seqlens_q, rows.cu_seqlens_k, rows.seqlen_q, rows.seqlen_k)
    head_bias, const_bias = _split(bias)
    if not torch.compiler.is_compiling():
        return _FlashEager.apply(q, k, v, head_bias, alibi, const_bias, params, varlen)
    return _flash_varlen_fwd_op(q, k, v, *varlen, head_bias, alibi, const_bias, *_op_options(params))


def sigmoid_attn_kvcache_flash(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor | None,
    block_table: Tensor | None,
    params: Params,
    bias: Bias,
    alibi: Tensor | None,
) -> Tensor:
    """Attention against a KV cache on the kernels (inference: no autograd); semantics of
    ``reference.sigmoid_attn_kvcache_reference``."""
    if not torch.compiler.is_compiling():
        # The op exists for torch.compile; eagerly its dispatch costs more than the kernel at short caches
        # (as for _FlashEager), and this op needs no autograd.
        return kernels.decode(q, k_cache, v_cache, params, bias, alibi, seqlens_k, block_table)
    head_bias, const_bias = _split(bias)
    return _flash_kvcache_fwd_op(
        q, k_cache, v_cache, seqlens_k, block_table, head_bias, alibi, const_bias, *_op_options(params)
    )
