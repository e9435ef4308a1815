"""Launching the Gluon kernels with little host time.

At 2k tokens (B=8, H=16, D=128, causal) the forward kernel runs for about 270 µs, and the H100 machine's
host needed as long to call it: 269 µs for the public forward, 136 for the launcher alone
(benchmarks/results/host_overhead_d128_h100_2026-11-25.json). Triton's JIT path binds and specialises every
argument on each launch, and the descriptor class re-validates what ``unsupported_common`` has
already checked. Here (128 and 54 µs since, ``..._direct_launch.json``):

* ``descriptor`` builds a TMA descriptor without those checks;
* ``launch`` compiles a kernel through the JIT once per key and launches the compiled kernel directly
  afterwards. That is only sound for kernels that specialise on nothing but their constexprs and the
  dtypes of their tensors: their integer arguments are ``do_not_specialize`` (the JIT would otherwise
  compile a variant for values divisible by 16) and their pointer arguments
  ``do_not_specialize_on_alignment``. Kernels that make TMA descriptors on the device (the packed Hopper
  backward: one per sequence) get their global scratch from PyTorch's allocator, for their launch only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor
from triton import knobs
from triton.compiler import CompiledKernel
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime import _allocation, driver

from . import compat
from .params import Rows
from .reference import Mask

_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}

_compiled: dict[tuple, CompiledKernel] = {}


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ of host integers (``triton.cdiv`` is a constexpr function: a few µs per call on the host)."""
    return -(-a // b)


def visible_keys(seqlen_q: int, seqlen_k: int, diag_offset: int, window: tuple[int, int]) -> tuple[int, int]:
    """[first, last): the keys of a dense row that some query may see, with query i at key position
    i + diag_offset and the window (left, right) (-1 unbounded; causal is right = 0). The kernels' K and V
    descriptors cover only these, so the keys no query sees load as zeros: a NaN there cannot reach a
    product through 0 x NaN (the tile of an edge holds keys past the window's reach)."""
    left, right = window
    first = max(0, diag_offset - left) if left >= 0 else 0
    last = min(seqlen_k, seqlen_q + diag_offset + right) if right >= 0 else seqlen_k
    return first, max(first, last)


class Diagonals(NamedTuple):
    """Where a launch's rows see keys, as both Gluon kernels read it. Dense rows: the K and V descriptors
    cover only the keys some query sees, [first, seen) (``visible_keys``; the others load as zeros) and key
    positions count from ``first``; packed sequences: every key (first 0, seen None), the kernel adding each
    sequence's Sk - Sq to the offsets. Query i sees key j where j <= i + diag_offset (a causal diagonal, or
    a window's right bound folded into it) and j >= i + lo_offset (a window's left bound); ALiBi's distance
    is |i + key_offset - j|. ``seqlen_k``: the keys from ``first`` on."""

    first: int
    seen: int | None
    seqlen_k: int
    diag_offset: int
    lo_offset: int
    key_offset: int


def diagonals(mask: Mask, seqlen_q: int, seqlen_k: int, varlen: bool) -> Diagonals:
    """The ``Diagonals`` of ``mask`` over rows of ``seqlen_q`` queries and ``seqlen_k`` keys (for packed
    sequences the longest lengths)."""
    left, right = mask.bounds
    if varlen:
        first, seen, diag = 0, None, 0
    else:
        diag = 0 if mask.top_left else seqlen_k - seqlen_q
        first, seen = visible_keys(seqlen_q, seqlen_k, diag, mask.bounds)
        diag -= first
        seqlen_k -= first
    return Diagonals(first, seen, seqlen_k, diag + max(right, 0), diag - left, diag)


def visible_queries(seqlen_q: int, seqlen_k: int, diag_offset: int, window: tuple[int, int]) -> tuple[int, int]:
    """[first, last): the queries of a dense row that see some key (``visible_keys``' conventions). The
    backward's Q and dO descriptors cover only these: the others have no gradient to give, and a NaN there
    cannot reach dK or dV through 0 x NaN."""
    left, right = window
    first = max(0, -(diag_offset + right)) if right >= 0 else 0
    last = min(seqlen_q, seqlen_k - diag_offset + left) if left >= 0 else seqlen_q
    return first, max(first, last)


@functools.lru_cache
def is_sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


def batch_rows(rows: Rows, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors as the Gluon kernels see them: (B, S, H, D), packed (total, H, D) ones as one row."""
    return tuple(t.unsqueeze(0) for t in tensors) if rows.varlen else tensors


def unsupported_common(q: Tensor, k: Tensor, v: Tensor, tensors: tuple[Tensor | None, ...]) -> str | None:
    """What neither Hopper kernel runs: dtypes other than bf16 and fp16, a value head dim other than the
    query's, no keys, and ``tensors`` TMA cannot address (None: a buffer made for the call, which it can);
    nor any call with a Triton release they were not tested with (``compat.SUPPORTED``)."""
    if compat.UNSUPPORTED_TRITON is not None:
        return compat.UNSUPPORTED_TRITON
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype}, not bfloat16 or float16"
    if v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} differs from the query's {q.shape[-1]}"
    if k.shape[-3] == 0:
        return "no keys"
    for t in tensors:
        if t is not None and not tma_addressable(t):
            return "a tensor TMA cannot address (last dim not contiguous, or base or strides not 16-byte aligned)"
    return None


def tma_addressable(t: Tensor) -> bool:
    """Whether TMA can address a (B, S, H, D) tensor, or packed (total, H, D) one: 16-byte aligned base and
    strides, but the last, which must be 1."""
    # (No loops or generators: this runs for every tensor of every call; host time: benchmarks/host_ab.py.)
    b, s, h, d = t.stride() if t.dim() == 4 else (0, *t.stride())
    # With a power-of-two element size, every stride is a multiple of 16 bytes iff their bitwise or is.
    return d == 1 and t.data_ptr() % 16 == 0 and (b | s | h) * t.element_size() % 16 == 0


@functools.lru_cache
def _smem_layout(block: tuple[int, ...], dtype: torch.dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for(list(block), _GL_DTYPES[dtype])


def descriptor(t: Tensor, rows: int, cols: int | None = None) -> TensorDescriptor:
    """A TMA descriptor of a (B, S, H, D) tensor with blocks of ``rows`` positions of one head (and ``cols``
    of its D columns; all by default). The caller has checked ``tma_addressable(t)``; the block shape is a
    power of two per dimension. Positions outside t (a view can end early) load as zeros."""
    block = (1, rows, 1, cols or t.shape[-1])
    # TensorDescriptor's constructor re-checks alignment and block shape: 5 µs of the H100 host per
    # descriptor, up to seven per launch. Its fields are set directly instead.
    desc = object.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides = t, list(t.shape), list(t.stride())
    desc.block_shape, desc.layout, desc.padding = list(block), _smem_layout(block, t.dtype), "zero"
    return desc


def _scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    """A launch's global scratch, from PyTorch's caching allocator (its blocks are 512-byte aligned, more
    than the 128 bytes a TMA descriptor needs)."""
    return torch.empty(size, dtype=torch.int8, device=torch.cuda.current_device())


def launch(kernel, grid: tuple[int, int, int], args: tuple, key: tuple, **options) -> None:
    """``kernel[grid](*args, **options)``, where ``args`` lists every parameter in order (constexprs
    included) and ``key`` determines the compiled kernel: its constexprs and its tensors' dtypes."""
    device = driver.active.get_current_device()
    compiled = _compiled.get((kernel, device, key))
    # Triton's launcher takes a kernel's global scratch from the allocator in this context variable; the
    # caller's own (if any) is back in place when the launch returns.
    token = _allocation._allocator.set(_scratch)
    try:
        if compiled is None or knobs.runtime.launch_enter_hook.calls or knobs.runtime.launch_exit_hook.calls:
            # The JIT path: compiles on the first call, and runs the launch hooks profilers install.
            _compiled[(kernel, device, key)] = kernel[grid](*args, **options)
            return
        stream = driver.active.get_current_stream(device)
        compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *args)
    finally:
        _allocation._allocator.reset(token)
