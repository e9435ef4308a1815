"""Backends behind one dispatcher.

Each backend says which calls it cannot serve and why (``not_supported_reasons``). The choice comes from,
in order: the ``use_backend`` context manager, the ``SIGATTN_BACKEND`` environment variable, or ``auto``.
``auto`` takes the first backend of ``AUTO_ORDER`` that can serve the call; every backend computes the
same function, so falling back never changes results (only speed, and a fall back from the GPU kernels
is announced by a warning). A forced backend that cannot serve a call raises ``BackendNotSupportedError``.

The ``triton`` backend also declines where its kernels cannot run at all: a GPU older than Ampere, kernels
that do not import with the installed Triton (``kernels_import_error``), and kinds of call whose kernels
Triton's compiler failed to build here (``dispatch`` remembers them). ``kernels_for_gpu`` says which
kernels serve which GPUs.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from .ops.sigmoid_attn.blocked import sigmoid_attn_blocked, without_autocast
from .ops.sigmoid_attn.dropout import Dropout
from .ops.sigmoid_attn.params import Params, Rows
from .ops.sigmoid_attn.reference import (
    Bias,
    Mask,
    gather_paged_cache,
    masked_reference,
    resolve_bias,
    sigmoid_attn_kvcache_reference,
    sigmoid_attn_varlen_reference,
)
from .ops.sigmoid_attn.traceable import sigmoid_attn_traceable, sigmoid_attn_varlen_traceable

ENV_VAR = "SIGATTN_BACKEND"
CallKind = Literal["dense", "varlen", "kvcache"]


def _constant_under_compile(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo``, which that decorator
    does and which took 1.0 of the 2.1 s ``import sigattn`` cost (``python -X importtime``, torch 2.13 on a
    2-core CPU). The decorator only sets this attribute, which dynamo reads when it traces a call of ``fn``
    (``torch/_dynamo/decorators.py``); ``tests/test_import.py`` checks that the two still agree, and the
    ``fullgraph=True`` tests would break on a graph break if dynamo stopped honouring it."""
    fn._dynamo_marked_constant = True
    return fn


@dataclass
class AttnCall:
    """One validated call of a public function, in flash layout ((B, S, H, D), or (total, H, D) for varlen).

    ``bias`` is resolved here, once, for every backend and kernel: a call whose rows all have the same key
    count (dense; a cache without ``seqlens_k``) turns None into ``-log(Sk)`` (``reference.resolve_bias``);
    packed sequences and caches with lengths keep None, -log of each row's own count. ``mask`` is the one
    description of the causal and window masks and their alignment. ``seqlens_k`` (kvcache) is each row's
    number of keys after the append (None: the whole cache). ``dropout``: attention dropout (training), with
    the seed drawn once for the call, so that its backward drops what its forward did."""

    kind: CallKind
    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    bias: Bias
    mask: Mask
    alibi_slopes: Tensor | None
    deterministic: bool
    attn_mask: Tensor | None = None
    cu_seqlens_q: Tensor | None = None
    cu_seqlens_k: Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    seqlens_k: Tensor | None = None
    block_table: Tensor | None = None
    dropout: Dropout | None = None

    @property
    def qkv(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.q, self.k, self.v

    def __post_init__(self):
        if self.kind == "dense":
            self.bias = resolve_bias(self.bias, self.k.shape[1])
        elif self.kind == "kvcache" and self.seqlens_k is None:  # every row holds the whole cache
            self.bias = resolve_bias(self.bias, _rows(self).seqlen_k)


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
        with without_autocast(call.q.device):
            out = self._attend(call)
        return _CanonicalGrad.apply(out) if out.requires_grad else out

    def _attend(self, call: AttnCall) -> Tensor:
        traced = torch.compiler.is_compiling()
        dense = self.traced_dense if traced else self.dense
        k, v = call.k, call.v
        if call.block_table is not None:
            # A paged cache's rows, as its block table reads them; the gather keeps a strided pool's layout.
            k, v = (gather_paged_cache(t, call.block_table) for t in (k, v))
        q, k, v = (_canonical(t) for t in (call.q, k, v))
        options = dict(
            scale=call.scale, bias=call.bias, mask=call.mask, alibi_slopes=call.alibi_slopes, dropout=call.dropout
        )
        if call.kind == "varlen":
            cu_seqlens = (call.cu_seqlens_q, call.cu_seqlens_k)
            if traced:
                return sigmoid_attn_varlen_traceable(q, k, v, *cu_seqlens, exact=self.exact, **options)
            return sigmoid_attn_varlen_reference(q, k, v, *cu_seqlens, dense=dense, **options)
        if call.kind == "kvcache":
            return sigmoid_attn_kvcache_reference(q, k, v, call.seqlens_k, dense=dense, **options)
        return dense(q, k, v, attn_mask=_canonical_mask(call.attn_mask), **options)


# PyTorch's CPU matrix products choose their algorithm, and so their rounding, by the operands' layout: a
# permuted v, or even the stride of a size-1 dim, changed an output by an ulp. The PyTorch backends compute
# from fresh row-major copies, so that every layout of an argument gives the bits of a contiguous one.


def _canonical(t: Tensor) -> Tensor:
    """A fresh row-major copy of t (standard strides, size-1 dims included), differentiable."""
    return t.clone(memory_format=torch.contiguous_format)


def _canonical_mask(mask: Tensor | None) -> Tensor | None:
    """The mask as a fresh row-major copy of its distinct values: an expanded (stride 0) dim becomes size 1,
    so a broadcast mask is not materialised. Not for a mask that receives a gradient: that is one per
    element of it, as for a contiguous mask, and the narrowed mask would give the first element the sum."""
    if mask is None:
        return None
    if not (mask.requires_grad and torch.is_grad_enabled()):
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
    return masked_reference(q, k, v, upcast=True, **options).to(q.dtype)


# Looked up once: find_spec costs 37 us, too much for every dispatch.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
KERNELS_MODULE = "sigattn.ops.sigmoid_attn.flash"
MIN_CAPABILITY = (8, 0)  # the Triton kernels' bf16 tensor-core products need Ampere or newer


def kernels_for_gpu(capability: tuple[int, int] | None) -> str:
    """Which kernels serve calls on a GPU of this compute capability (None: no CUDA GPU), and what this
    project measured there. ``sigattn info`` prints it; the README's table says the same."""
    if capability is None:
        return (
            "no CUDA GPU: the 'torch' backend serves every call (the Triton kernels run on the CPU only in "
            "Triton's interpreter, for tests)"
        )
    name = f"sm_{capability[0]}{capability[1]}"
    if capability < MIN_CAPABILITY:
        return f"{name}: no kernels (they need compute capability 8.0 or newer); the 'torch' backend serves every call"
    if capability == (9, 0):
        return (
            "Hopper (sm_90): Gluon kernels (dense and packed calls at head dims 64 and 128, forward and backward; "
            "full, causal, sliding windows, ALiBi) and the Triton kernels for the rest; speed and correctness "
            "measured on H100 and H200"
        )
    family = "Ampere/Ada" if capability < (9, 0) else "Blackwell or newer"
    wide = "" if capability < (10, 0) else " (calls with gradients at head dims above 128 run on 'torch')"
    return (
        f"{family} ({name}): the Triton kernels{wide}, compiled in CI for sm_80, sm_90 and sm_100 targets but "
        "never run on such a GPU by this project (neither speed nor correctness measured there)"
    )


@_constant_under_compile
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def triton_version() -> str | None:
    """The installed Triton's version, read from its metadata (without importing it); None if absent."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


_import_error: list[str | None] = []  # [] until the kernels' import was tried, then [None] or [the reason]


@_constant_under_compile
def kernels_import_error() -> str | None:
    """Why the Triton kernels cannot be used here (None: they import). Tried once, on the first call that
    could run on them (importing them imports Triton: about a second), and remembered: a Triton whose API
    differs from the one the kernels were written for fails here, not in the middle of a call."""
    if not _import_error:
        if not _TRITON_INSTALLED:
            _import_error.append("triton is not installed")
        else:
            try:
                importlib.import_module(KERNELS_MODULE)
            except Exception as error:  # any failure to import means the same: these kernels cannot run here
                _import_error.append(f"the kernels do not import with triton {triton_version()} ({_first_line(error)})")
            else:
                _import_error.append(None)
    return _import_error[0]


def _first_line(error: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters. Triton's compile errors start with the kernel's
    source and keep the message itself in ``error_message``."""
    message = getattr(error, "error_message", None)
    lines = str(message if isinstance(message, str) and message else error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 300 else text[:297] + "..."


# Calls whose kernels failed to build (compile or load) on this machine, by ``_kernel_key``, with the reason:
# auto sends such calls to the next backend, and a forced "triton" refuses them.
_failed_builds: dict[tuple, str] = {}


def _kernel_key(call: AttnCall) -> tuple:
    """What chooses and specialises the kernels of a call, lengths aside: calls with the same key compile the
    same kernels (give or take the tile choices of short and long calls)."""
    return (
        call.kind,
        call.q.device,
        call.q.dtype,
        call.q.shape[-1],
        call.v.shape[-1],
        call.mask.bounds[1] >= 0,
        call.mask.bounds != (-1, -1),
        call.alibi_slopes is not None,
        isinstance(call.bias, Tensor),
        call.deterministic,
        call.block_table is not None,
    )


def _build_failure(error: BaseException, call: AttnCall) -> str | None:
    """The reason to give if ``error`` means the kernels could not be built for ``call`` here: an import
    that fails during the call, or any error raised inside Triton's compiler (its front end, ``ptxas``, or
    loading the binary onto the GPU: too much shared memory, say); None for every other error, which is
    the call's own."""
    if not (isinstance(error, ImportError) or _raised_in_triton_compiler(error)):
        return None
    device, where = call.q.device, call.q.device.type
    if device.type == "cuda":
        major, minor = _capability(torch.cuda.current_device() if device.index is None else device.index)
        where = f"compute capability {major}.{minor}"
    return (
        f"its kernels failed to build for calls like this one (triton {triton_version()}, {where}: "
        f"{_first_line(error)})"
    )


def _raised_in_triton_compiler(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_globals.get("__name__", "").startswith("triton.compiler"):
                return True
            tb = tb.tb_next
        error = error.__cause__ or error.__context__
    return False


def _needs_backward(call: AttnCall) -> bool:
    tensors = (*call.qkv, call.bias) if isinstance(call.bias, Tensor) else call.qkv
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _on_blackwell_or_newer(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    return _capability(torch.cuda.current_device() if device.index is None else device.index) >= (10, 0)


class TritonBackend:
    """The FlashSigmoid Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton"
    description = "FlashSigmoid Triton kernels (CUDA; CPU through TRITON_INTERPRET=1)"

    def not_supported_reasons(self, call: AttnCall) -> list[str]:
        if not _TRITON_INSTALLED:
            return ["triton is not installed"]
        reasons = self._device_reasons(call.q.device)
        if not reasons:  # only a call on a device the kernels run on pays for importing them
            failure = kernels_import_error() or (_failed_builds and _failed_builds.get(_kernel_key(call)))
            if failure:
                reasons.append(failure)
        if call.q.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"dtype {call.q.dtype} (the kernels take float16 and bfloat16)")
        widest = max(call.q.shape[-1], call.v.shape[-1])
        if widest > 256:
            dims = f"{call.q.shape[-1]}" + (f" (v: {call.v.shape[-1]})" if call.v.shape[-1] != call.q.shape[-1] else "")
            reasons.append(f"head dim {dims} (at most 256)")
        elif widest > 128 and _needs_backward(call) and _on_blackwell_or_newer(call.q.device):
            # Triton 3.6-3.9 compile this dK/dV kernel for sm_100 to a single trap: its accumulators and score
            # tiles need more tensor memory than there is (tests/test_triton_targets.py).
            reasons.append(f"head dim {widest} with gradients on compute capability 10.0 or newer")
        if call.kind == "kvcache" and torch.is_grad_enabled():
            if call.q.requires_grad:
                reasons.append("q requires grad (the KV-cache kernel is for inference)")
            if isinstance(call.bias, Tensor) and call.bias.requires_grad:
                reasons.append("the bias tensor requires grad (the KV-cache kernel is for inference)")
        if call.attn_mask is not None:
            reasons.append("an explicit attn_mask (the kernels support causal and sliding-window masks)")
        return reasons

    @staticmethod
    def _device_reasons(device: torch.device) -> list[str]:
        if device.type == "cpu":
            # The interpreter is for testing the kernels: auto never picks it.
            if os.environ.get("TRITON_INTERPRET") != "1" or requested_backend() != "triton":
                return [
                    "CPU tensors (the kernels run on the CPU only in Triton's interpreter: "
                    "TRITON_INTERPRET=1 with the 'triton' backend forced)"
                ]
            return []
        if device.type != "cuda":
            return [f"{device.type} tensors (the kernels run on CUDA)"]
        capability = _capability(torch.cuda.current_device() if device.index is None else device.index)
        if capability < MIN_CAPABILITY:
            return [f"compute capability {capability} (needs 8.0 or newer)"]
        return []

    def __call__(self, call: AttnCall) -> Tensor:
        from .ops.sigmoid_attn import flash

        params = Params(call.scale, call.mask, call.deterministic, call.dropout)
        q, k, v = call.q, call.k, call.v
        if call.kind == "varlen":
            return flash.sigmoid_attn_varlen_flash(q, k, v, _rows(call), params, call.bias, call.alibi_slopes)
        if call.kind == "kvcache":
            return flash.sigmoid_attn_kvcache_flash(
                q, k, v, call.seqlens_k, call.block_table, params, call.bias, call.alibi_slopes
            )
        return flash.sigmoid_attn_flash(q, k, v, params, call.bias, call.alibi_slopes)

    @staticmethod
    def kernels(call: AttnCall) -> dict[str, tuple[str, dict[str, str]]]:
        """For each direction of ``call`` (forward and backward, or decode), the kernel that runs it and why
        each kernel tried before it declined (``ops/sigmoid_attn/kernels.py``)."""
        from .ops.sigmoid_attn import kernels

        params = Params(call.scale, call.mask, call.deterministic, call.dropout)
        return kernels.explain(call.kind == "kvcache", *call.qkv, params, call.bias, call.alibi_slopes, _rows(call))


def _rows(call: AttnCall) -> Rows:
    """Where the batch rows' tokens of ``call`` are, as the kernels read it."""
    if call.kind == "varlen":
        return Rows.packed(call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q, call.max_seqlen_k)
    if call.kind == "kvcache":
        return Rows.cache(call.q, call.k, call.seqlens_k, call.block_table)
    return Rows.dense(call.q, call.k)


BACKENDS: dict[str, Backend] = {
    "triton": TritonBackend(),
    "torch": TorchBackend(
        "torch",
        sigmoid_attn_blocked,
        sigmoid_attn_traceable,
        False,
        "memory-efficient blocked PyTorch (O(S*D) memory, recomputing backward); under torch.compile, "
        "materialised scores (O(S^2))",
    ),
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
@_constant_under_compile
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


def _choose(call: AttnCall, every: bool = False) -> tuple[str, str | None, dict[str, list[str]]]:
    """The rule: (the requested name, the backend that serves ``call``: the requested one if it can, else under
    ``auto`` the first of ``AUTO_ORDER`` that can, None if none can, the reasons to decline of the backends it
    asked). ``every``: ask every backend. (A dispatch asks no further than it must: the reasons of the others
    cost host time on every call.)"""
    requested = requested_backend()
    reasons, chosen = {}, None
    for name in AUTO_ORDER if requested == "auto" else (requested,):
        reasons[name] = BACKENDS[name].not_supported_reasons(call)
        if not reasons[name]:
            chosen = name
            break
    if every:
        reasons.update({n: b.not_supported_reasons(call) for n, b in BACKENDS.items() if n not in reasons})
    return requested, chosen, reasons


def explain(call: AttnCall) -> dict:
    """What the dispatcher does with ``call``, without doing it (and without its fall-back warning):

    ``backend``: the backend that runs it (None: the call raises); ``kernels``: for the ``triton`` backend,
    the kernel of each direction (forward and backward, or decode); ``why_not``: why each other backend,
    and each kernel tried before the chosen one (``"<kernel> <direction>"``), does not run it."""
    requested, chosen, reasons = _choose(call, every=True)
    why_not = {}
    for name, declined in reasons.items():
        if name == chosen:
            continue
        if declined:
            why_not[name] = declined
        elif requested != "auto":
            why_not[name] = [f"not requested ({requested!r} is forced)"]
        elif name not in AUTO_ORDER:
            why_not[name] = ["not tried by auto (force it with use_backend or $SIGATTN_BACKEND)"]
        else:
            why_not[name] = [f"{chosen!r} comes first in the auto order"]
    kernels = {}
    if chosen == "triton":
        for direction, (kernel, declined) in BACKENDS["triton"].kernels(call).items():
            kernels[direction] = kernel
            why_not.update({f"{name} {direction}": [reason] for name, reason in declined.items()})
    return {"backend": chosen, "kernels": kernels, "why_not": why_not}


def select_backend(call: AttnCall) -> Backend:
    requested, chosen, reasons = _choose(call)
    if chosen is None and requested != "auto":
        why = "; ".join(reasons[requested])
        raise BackendNotSupportedError(
            f"backend {requested!r} was requested but cannot run this {call.kind} call: {why}"
        )
    if chosen is None:
        raise BackendNotSupportedError(
            f"no backend can run this {call.kind} call: "
            + "; ".join(f"{n}: {', '.join(reasons[n])}" for n in AUTO_ORDER)
        )
    if len(reasons) > 1 and call.q.device.type == "cuda":  # backends before the chosen one declined
        _warn_fallback(call, chosen, {name: why for name, why in reasons.items() if name != chosen})
    return BACKENDS[chosen]


def _warn_fallback(call: AttnCall, chosen: str, declined: dict[str, list[str]]) -> None:
    why = "; ".join(f"{n}: {', '.join(r)}" for n, r in declined.items())
    key = (call.kind, why)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"sigattn: {call.kind} attention on {call.q.device.type.upper()} runs on the slower {chosen!r} "
            f"backend ({why})",
            stacklevel=4,
        )


def dispatch(call: AttnCall, backend: Backend | None = None) -> Tensor:
    """Runs ``call`` on ``backend`` (by default the one ``select_backend`` picks).

    If the Triton kernels fail to build for the call (``_build_failure``: Triton's compiler raised, for
    a GPU or a Triton the kernels were not written for), calls like it are remembered as ones the kernels
    cannot serve; then under ``auto`` this call and later ones run on the next backend, with a warning
    (once per reason), and a forced ``triton`` raises ``BackendNotSupportedError`` with the reason. Under
    ``torch.compile`` the kernels are built when the compiled code first runs, outside this function."""
    backend = select_backend(call) if backend is None else backend
    if backend.name != "triton" or torch.compiler.is_compiling():
        return backend(call)
    try:
        return backend(call)
    except Exception as error:
        reason = _build_failure(error, call)
        if reason is None:
            raise
        _failed_builds[_kernel_key(call)] = reason
        if requested_backend() != "auto":
            raise BackendNotSupportedError(
                f"backend 'triton' was requested but cannot run this {call.kind} call: {reason}"
            ) from error
        fallback = select_backend(call)  # the kernels now decline calls like this one
        _warn_fallback(call, fallback.name, {"triton": [reason]})
        return fallback(call)


__all__ = [
    "AttnCall",
    "Backend",
    "BackendNotSupportedError",
    "BACKENDS",
    "AUTO_ORDER",
    "dispatch",
    "explain",
    "kernels_for_gpu",
    "kernels_import_error",
    "requested_backend",
    "select_backend",
    "use_backend",
]
