"""Backends behind one dispatcher.

Each backend says which calls it cannot serve and why (``not_supported_reasons``). The choice comes from,
in order: the ``use_backend`` context manager, the ``SIGATTN_BACKEND`` environment variable, or ``auto``.
``auto`` takes the first backend of ``AUTO_ORDER`` that can serve the call; every backend computes the
same function, so falling back never changes results (only speed, and a fall back from the GPU kernels
is announced by a warning). A forced backend that cannot serve a call raises ``BackendNotSupportedError``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

from .ops.sigmoid_attn.blocked import sigmoid_attn_blocked
from .ops.sigmoid_attn.reference import (
    sigmoid_attn_kvcache_reference,
    sigmoid_attn_reference,
    sigmoid_attn_varlen_reference,
)
from .ops.sigmoid_attn.traceable import sigmoid_attn_traceable, sigmoid_attn_varlen_traceable

ENV_VAR = "SIGATTN_BACKEND"
CallKind = Literal["dense", "varlen", "kvcache"]


@dataclass
class AttnCall:
    """One validated call of a public function, in flash layout ((B, S, H, D), or (total, H, D) for varlen).

    ``top_left`` aligns the causal diagonal at the top-left (SDPA) instead of the bottom-right (flash-attn).
    ``seqlens_k`` (kvcache) is each row's number of keys after the append (None: the whole cache)."""

    kind: CallKind
    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    bias: float | Tensor | None
    causal: bool
    window_size: tuple[int, int]
    alibi_slopes: Tensor | None
    deterministic: bool
    top_left: bool = False
    attn_mask: Tensor | None = None
    cu_seqlens_q: Tensor | None = None
    cu_seqlens_k: Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    seqlens_k: Tensor | None = None
    block_table: Tensor | None = None
    options: dict = field(init=False)

    @property
    def qkv(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.q, self.k, self.v

    def __post_init__(self):
        self.options = dict(
            scale=self.scale,
            bias=self.bias,
            causal=self.causal,
            window_size=self.window_size,
            top_left=self.top_left,
        )


class BackendNotSupportedError(ValueError):
    """A forced backend cannot serve the call; the message lists why."""


class Backend(Protocol):
    name: str

    def not_supported_reasons(self, call: AttnCall) -> list[str]: ...

    def __call__(self, call: AttnCall) -> Tensor: ...


class TorchBackend:
    """Plain PyTorch: any device, every option. ``dense`` is the (B, S, H, D) attention it builds on, and
    ``traced_dense`` the one it uses while ``torch.compile`` traces (``ops/sigmoid_attn/traceable.py``:
    no control flow on values, so ``fullgraph=True`` and dynamic shapes work); ``exact`` computes in float64."""

    def __init__(self, name: str, dense, traced_dense, exact: bool, description: str):
        self.name = name
        self.dense = dense
        self.traced_dense = traced_dense
        self.exact = exact
        self.description = description

    def not_supported_reasons(self, call: AttnCall) -> list[str]:
        if call.q.dtype == torch.float64 and call.q.device.type == "mps":
            return ["float64 is not supported on mps"]
        return []

    def __call__(self, call: AttnCall) -> Tensor:
        out = self._attend(call)
        return _CanonicalGrad.apply(out) if out.requires_grad else out

    def _attend(self, call: AttnCall) -> Tensor:
        traced = torch.compiler.is_compiling()
        dense = self.traced_dense if traced else self.dense
        # A paged cache is a pool of pages, read by gathering (a fresh copy); any other q, k, v is copied too.
        q, k, v = (t if call.block_table is not None and t is not call.q else _canonical(t) for t in call.qkv)
        if call.kind == "varlen":
            if traced:
                return sigmoid_attn_varlen_traceable(
                    q, k, v, call.cu_seqlens_q, call.cu_seqlens_k, alibi_slopes=call.alibi_slopes, exact=self.exact,
                    **call.options,
                )  # fmt: skip
            return sigmoid_attn_varlen_reference(
                q, k, v, call.cu_seqlens_q, call.cu_seqlens_k, alibi_slopes=call.alibi_slopes, dense=dense,
                **call.options,
            )  # fmt: skip
        if call.kind == "kvcache":
            return sigmoid_attn_kvcache_reference(
                q, k, v, call.seqlens_k, block_table=call.block_table, alibi_slopes=call.alibi_slopes, dense=dense,
                **call.options,
            )  # fmt: skip
        mask = _canonical_mask(call.attn_mask)
        return dense(q, k, v, alibi_slopes=call.alibi_slopes, attn_mask=mask, **call.options)


# PyTorch's CPU matrix products choose their algorithm, and so their rounding, by the operands' layout: a
# permuted v, or even the stride of a size-1 dim, changed an output by an ulp. The PyTorch backends compute
# from fresh row-major copies, so that every layout of an argument gives the bits of a contiguous one.


def _canonical(t: Tensor) -> Tensor:
    """A fresh row-major copy of t (standard strides, size-1 dims included), differentiable."""
    return t.clone(memory_format=torch.contiguous_format)


def _canonical_mask(mask: Tensor | None) -> Tensor | None:
    """The mask as a fresh row-major copy of its distinct values: an expanded (stride 0) dim becomes size 1,
    so a broadcast mask is not materialised."""
    if mask is None:
        return None
    for dim, (size, stride) in enumerate(zip(mask.shape, mask.stride(), strict=True)):
        if stride == 0 and size > 1:
            mask = mask.narrow(dim, 0, 1)
    return _canonical(mask)


class _CanonicalGrad(torch.autograd.Function):
    """The identity, whose backward hands on a fresh row-major copy of the output gradient (its layout would
    otherwise steer the backward's products as the inputs' did)."""

    @staticmethod
    def forward(ctx, out: Tensor) -> Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _canonical(grad)


def _exact(q, k, v, **options) -> Tensor:
    return sigmoid_attn_reference(q, k, v, upcast=True, **options).to(q.dtype)


# Looked up once: find_spec costs 37 us, too much for every dispatch.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


@torch.compiler.assume_constant_result
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


class TritonBackend:
    """The FlashSigmoid Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton"
    description = "FlashSigmoid Triton kernels (CUDA; CPU through TRITON_INTERPRET=1)"

    def not_supported_reasons(self, call: AttnCall) -> list[str]:
        if not _TRITON_INSTALLED:
            return ["triton is not installed"]
        reasons = []
        device = call.q.device
        if device.type == "cpu":
            # The interpreter is for testing the kernels: auto never picks it.
            if os.environ.get("TRITON_INTERPRET") != "1" or requested_backend() != "triton":
                reasons.append(
                    "CPU tensors (the kernels run on the CPU only in Triton's interpreter: "
                    "TRITON_INTERPRET=1 with the 'triton' backend forced)"
                )
        elif device.type != "cuda":
            reasons.append(f"{device.type} tensors (the kernels run on CUDA)")
        else:
            capability = _capability(torch.cuda.current_device() if device.index is None else device.index)
            if capability < (8, 0):
                reasons.append(f"compute capability {capability} (needs 8.0 or newer)")
        if call.q.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"dtype {call.q.dtype} (the kernels take float16 and bfloat16)")
        if call.q.shape[-1] > 256:
            reasons.append(f"head dim {call.q.shape[-1]} (at most 256)")
        if call.kind == "kvcache" and call.q.requires_grad and torch.is_grad_enabled():
            reasons.append("q requires grad (the KV-cache kernel is for inference)")
        if call.attn_mask is not None:
            reasons.append("an explicit attn_mask (the kernels support causal and sliding-window masks)")
        return reasons

    def __call__(self, call: AttnCall) -> Tensor:
        from .ops.sigmoid_attn import flash

        if call.kind == "varlen":
            return flash.sigmoid_attn_varlen_flash(
                call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q, call.max_seqlen_k,
                alibi_slopes=call.alibi_slopes, **call.options,
            )  # fmt: skip
        if call.kind == "kvcache":
            return flash.sigmoid_attn_kvcache_flash(
                call.q, call.k, call.v, call.seqlens_k, block_table=call.block_table,
                alibi_slopes=call.alibi_slopes, **call.options,
            )  # fmt: skip
        return flash.sigmoid_attn_flash(
            call.q, call.k, call.v, alibi_slopes=call.alibi_slopes, deterministic=call.deterministic, **call.options
        )


BACKENDS: dict[str, Backend] = {
    "triton": TritonBackend(),
    "torch": TorchBackend(
        "torch", sigmoid_attn_blocked, sigmoid_attn_traceable, False,
        "memory-efficient blocked PyTorch (O(S*D) memory, recomputing backward); under torch.compile, "
        "materialised scores (O(S^2))",
    ),  # fmt: skip
    "reference": TorchBackend(
        "reference", _exact, _exact, True, "exact reference: materialises the scores, computes in float64"
    ),
}
AUTO_ORDER: list[str] = ["triton", "torch"]

_forced: ContextVar[str | None] = ContextVar("sigattn_backend", default=None)
_warned: set[tuple[str, str]] = set()


def _check_name(name: str, source: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{source} must be one of {['auto', *BACKENDS]}, got {name!r}")
    return name


# torch.compile cannot trace ContextVar.get: it reads the choice once, at trace time.
@torch.compiler.assume_constant_result
def requested_backend() -> str:
    """The backend asked for now: the ``use_backend`` context, else ``$SIGATTN_BACKEND``, else ``auto``."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return _check_name(os.environ.get(ENV_VAR, "auto").strip() or "auto", f"${ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (``"auto"``, ``"torch"``, ``"reference"``, ``"triton"``) inside a ``with`` block.

    Overrides ``$SIGATTN_BACKEND``. Thread- and task-local. A ``torch.compile``d function reads the
    choice when it is traced: changing it later does not re-trace."""
    token = _forced.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced.reset(token)


def explain(call: AttnCall) -> dict[str, list[str]]:
    """For every backend, why it cannot serve ``call`` (an empty list: it can)."""
    return {name: backend.not_supported_reasons(call) for name, backend in BACKENDS.items()}


def select_backend(call: AttnCall) -> Backend:
    name = requested_backend()
    if name != "auto":
        backend = BACKENDS[name]
        reasons = backend.not_supported_reasons(call)
        if reasons:
            raise BackendNotSupportedError(
                f"backend {name!r} was requested but cannot run this {call.kind} call: " + "; ".join(reasons)
            )
        return backend
    declined = {}
    for candidate in AUTO_ORDER:
        reasons = BACKENDS[candidate].not_supported_reasons(call)
        if not reasons:
            if declined and call.q.device.type == "cuda":
                _warn_fallback(call, candidate, declined)
            return BACKENDS[candidate]
        declined[candidate] = reasons
    raise BackendNotSupportedError(
        f"no backend can run this {call.kind} call: "
        + "; ".join(f"{n}: {', '.join(r)}" for n, r in declined.items())
    )


def _warn_fallback(call: AttnCall, chosen: str, declined: dict[str, list[str]]) -> None:
    why = "; ".join(f"{n}: {', '.join(r)}" for n, r in declined.items())
    key = (call.kind, why)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"sigattn: {call.kind} attention on CUDA runs on the slower {chosen!r} backend ({why})",
            stacklevel=4,
        )


def dispatch(call: AttnCall) -> Tensor:
    return select_backend(call)(call)


__all__ = [
    "AttnCall",
    "Backend",
    "BackendNotSupportedError",
    "BACKENDS",
    "AUTO_ORDER",
    "dispatch",
    "explain",
    "requested_backend",
    "select_backend",
    "use_backend",
]
