"""The kernels of each direction, as peers, and the one rule that chooses among them.

Each direction (forward, backward, decode) lists its kernels fastest first; each says why it cannot run a
call (``unsupported``: a reason, or None), and the first that can runs it. ``choose`` is that rule, and the
dispatcher (``sigattn.backends.explain``) asks it for the kernel a call will run and why the others
declined; nothing else decides. The Gluon kernels are the fast path on Hopper; the Triton kernels serve
every call the ``triton`` backend accepts (its checks: device, dtype, head dim, no explicit mask).

The entry points ``forward``, ``backward`` and ``decode`` take the tensors with any strides: they make the
last dim of q, k, v (and dO) contiguous and the small tensors (a per-head bias, ALiBi slopes, cu_seqlens,
cache lengths, block tables) dense row-major, which the kernels index them as, once per call. The bias is
``reference.Bias``: dense rows take it resolved (``reference.resolve_bias``), as the public functions pass it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import hopper, hopper_bwd, host, triton_host
from .params import Params, Rows
from .reference import Bias
from .triton_kernels import INTERPRET

Grads = tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class Kernel:
    """One kernel of a direction. ``unsupported`` and ``run`` take the direction's arguments: forward and
    decode (q, k, v, out, params, bias, alibi, rows), backward (do, q, k, v, grads, params, bias, alibi, rows).
    ``run`` of a forward writes ``out``; of a backward writes ``grads`` and returns the bias gradient."""

    name: str
    unsupported: Callable[..., str | None] | None  # None: serves every call the backend passes on
    run: Callable


def _sm90_reason(q: Tensor) -> str | None:
    if INTERPRET:
        return "Triton's interpreter (it runs only the Triton kernels)"
    if not q.is_cuda:
        return f"{q.device.type} tensors"
    if not host.is_sm90(q.device):
        major, minor = torch.cuda.get_device_capability(q.device)
        return f"compute capability {major}.{minor} (the Gluon kernels are for 9.0)"
    return None


def _gluon_forward_unsupported(q, k, v, out, params, bias, alibi, rows) -> str | None:
    return _sm90_reason(q) or hopper.unsupported(q, k, v, out, params, alibi, rows)


def _gluon_forward(q, k, v, out, params, bias, alibi, rows) -> None:
    hopper.forward(q, k, v, out, params, bias, alibi, rows)


def _gluon_backward_unsupported(do, q, k, v, grads, params, bias, alibi, rows) -> str | None:
    return _sm90_reason(q) or hopper_bwd.unsupported(do, q, k, v, grads, params, bias, rows)


def _gluon_backward(do, q, k, v, grads, params, bias, alibi, rows) -> Tensor | None:
    return hopper_bwd.backward(do, q, k, v, grads, params, bias, alibi, rows)


FORWARD = (
    Kernel("gluon-sm90", _gluon_forward_unsupported, _gluon_forward),
    Kernel("triton", None, triton_host.launch_forward),
)
BACKWARD = (
    Kernel("gluon-sm90", _gluon_backward_unsupported, _gluon_backward),
    Kernel("triton", None, triton_host.backward),
)
DECODE = (Kernel("triton", None, triton_host.decode),)


def choose(kernels: tuple[Kernel, ...], *args) -> tuple[Kernel, dict[str, str]]:
    """The first of ``kernels`` that can run the call ``args``, and why each one before it declined."""
    declined = {}
    for kernel in kernels:
        reason = None if kernel.unsupported is None else kernel.unsupported(*args)
        if reason is None:
            return kernel, declined
        declined[kernel.name] = reason
    raise AssertionError(f"no kernel serves the call: {declined}")  # the last kernel of each serves every call


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dense(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def empty_like(t: Tensor) -> Tensor:
    """The gradient buffers the entry points make (and ``flash.py``'s fake ops describe)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def empty_out(q: Tensor, v: Tensor) -> Tensor:
    """The output buffer the entry points make (and ``flash.py``'s fake ops describe): q's shape with v's
    head dim, contiguous."""
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _prepare(q: Tensor, k: Tensor, v: Tensor, bias: Bias, alibi: Tensor | None, rows: Rows):
    if bias is None and not rows.varlen and rows.seqlens_k is None:
        raise ValueError(
            "bias=None (-log of each row's key count) needs packed rows or cache lengths: a dense "
            "call takes the float of reference.resolve_bias"
        )
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    bias = _dense(bias) if isinstance(bias, Tensor) else bias
    if rows.varlen or rows.seqlens_k is not None or rows.block_table is not None:  # dense rows have none
        small = (rows.cu_seqlens_q, rows.cu_seqlens_k, rows.seqlens_k, rows.block_table)
        if any(t is not None and not t.is_contiguous() for t in small):
            rows = rows._replace(**{name: _dense(getattr(rows, name)) for name in Rows._fields[3:]})
    return q, k, v, bias, _dense(alibi), rows


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: Params,
    bias: Bias,
    alibi: Tensor | None = None,
    rows: Rows | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Forward of dense rows (q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv); ``rows`` None) or packed
    sequences (q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); ``Rows.packed``) on the first
    ``FORWARD`` kernel that runs it. ``out`` (q's shape with v's head dim, last dim contiguous) receives the
    result when given (tests poison it)."""
    rows = Rows.dense(q, k) if rows is None else rows
    q, k, v, bias, alibi, rows = _prepare(q, k, v, bias, alibi, rows)
    out = empty_out(q, v) if out is None else out
    if out.numel() == 0:
        return out
    kernel, _ = choose(FORWARD, q, k, v, out, params, bias, alibi, rows)
    kernel.run(q, k, v, out, params, bias, alibi, rows)
    return out


def backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: Params,
    bias: Bias,
    alibi: Tensor | None = None,
    rows: Rows | None = None,
    grads: Grads | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Backward of ``forward``: (dq, dk, dv, the bias gradient or None), on the first ``BACKWARD`` kernel that
    runs it (the Gluon one adds dQ atomically, so it declines ``params.deterministic`` and
    torch.use_deterministic_algorithms). ``grads`` = (dq, dk, dv) buffers receive the results when given."""
    rows = Rows.dense(q, k) if rows is None else rows
    q, k, v, bias, alibi, rows = _prepare(q, k, v, bias, alibi, rows)
    do = _last_dim_contiguous(do)
    grads = tuple(empty_like(t) for t in (q, k, v)) if grads is None else grads
    if q.numel() == 0 or k.numel() == 0:
        for grad in grads:
            grad.zero_()
        return (*grads, torch.zeros_like(bias) if isinstance(bias, Tensor) else None)
    kernel, _ = choose(BACKWARD, do, q, k, v, grads, params, bias, alibi, rows)
    return (*grads, kernel.run(do, q, k, v, grads, params, bias, alibi, rows))


def decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    params: Params,
    bias: Bias,
    alibi: Tensor | None,
    seqlens_k: Tensor | None,
    block_table: Tensor | None = None,
    out: Tensor | None = None,
    *,
    num_splits: int | None = None,
    pack_gqa: bool | None = None,
) -> Tensor:
    """Forward against a KV cache: q (B, Sq, Hq, D) attends to the first seqlens_k[b] (int32, read on the
    device: CUDA graphs may replay this as the cache grows; None: the whole cache) keys of row b of
    k_cache/v_cache, (B, capacity, Hkv, D), or paged (num_blocks, page_size, Hkv, D) through block_table
    (B, max_blocks). ``num_splits``/``pack_gqa`` override ``triton_host.kvcache_plan`` (tests force each
    path)."""
    rows = Rows.cache(q, k_cache, seqlens_k, block_table)
    q, k_cache, v_cache, bias, alibi, rows = _prepare(q, k_cache, v_cache, bias, alibi, rows)
    out = empty_out(q, v_cache) if out is None else out
    if out.numel() == 0:
        return out
    kernel, _ = choose(DECODE, q, k_cache, v_cache, out, params, bias, alibi, rows)
    kernel.run(q, k_cache, v_cache, out, params, bias, alibi, rows, num_splits=num_splits, pack_gqa=pack_gqa)
    return out


def explain(
    decoding: bool, q: Tensor, k: Tensor, v: Tensor, params: Params, bias: Bias, alibi: Tensor | None, rows: Rows
) -> dict[str, tuple[str, dict[str, str]]]:
    """For each direction of a call (decode; or forward and backward), the kernel ``choose`` picks and why
    each one before it declined, as the entry points will decide: the output and gradient buffers they make
    are fresh, and the output gradient is taken to be laid out like them."""
    q, k, v, bias, alibi, rows = _prepare(q, k, v, bias, alibi, rows)
    if decoding:
        return {"decode": _named(choose(DECODE, q, k, v, None, params, bias, alibi, rows))}
    return {
        "forward": _named(choose(FORWARD, q, k, v, None, params, bias, alibi, rows)),
        "backward": _named(choose(BACKWARD, None, q, k, v, None, params, bias, alibi, rows)),
    }


def _named(choice: tuple[Kernel, dict[str, str]]) -> tuple[str, dict[str, str]]:
    return choice[0].name, choice[1]
