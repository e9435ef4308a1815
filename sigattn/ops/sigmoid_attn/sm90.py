"""What both Gluon kernels for sm_90 (``hopper.py``, ``hopper_bwd.py``) use on the device: the register
budget of a program of consumer warpgroups and one loader warp, and the bounds, TMA descriptors, default bias
and masked row stores of packed sequences."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma

# (Constexprs: the kernels read them as globals.)
LOADER_REGISTERS = gl.constexpr(24)  # per loader thread, once it has given back the rest


def register_split(consumers: int) -> tuple[int, int]:
    """(registers per thread at launch, per consumer thread) of a program with ``consumers`` warpgroups and
    a loader warp, rounded up to a group: at launch they share the SM's 64k registers equally; the loader
    then gives back all but LOADER_REGISTERS, which the consumers share (all in steps of 8). Two groups: 168
    and 240; three: 128 and 160; four: 96 and 112, enough for D = 64 without spills."""
    launch = 65536 // (128 * (consumers + 1)) // 8 * 8
    return launch, (launch + (launch - int(LOADER_REGISTERS)) // consumers) // 8 * 8


# Two consumer groups, as the backward (hopper_bwd.py) always has.
MAX_REGISTERS = register_split(2)[0]
CONSUMER_REGISTERS = gl.constexpr(register_split(2)[1])


@gluon.jit
def sequence(cu_seqlens_q, cu_seqlens_k, b):
    """(first query token, Sq, first key token, Sk) of packed sequence b."""
    q_start = gl.load(cu_seqlens_q + b)
    k_start = gl.load(cu_seqlens_k + b)
    return q_start, gl.load(cu_seqlens_q + b + 1) - q_start, k_start, gl.load(cu_seqlens_k + b + 1) - k_start


@gluon.jit
def sequence_descriptor(desc, ptr, start, length):
    """A TMA descriptor, made on the device, of packed sequence rows ``start`` .. ``start + length - 1`` of
    ``ptr``, the (1, total, H, D) tensor that ``desc`` describes: a tile that ends past the sequence loads
    zeros there, not the next sequence's rows, where a NaN would reach this sequence's products through
    0 x NaN. (At least one row: a descriptor has no empty dimension; a sequence without rows loads none.)"""
    return tma.make_tensor_descriptor(
        ptr + start.to(gl.int64) * desc.strides[1],
        [1, gl.maximum(length, 1), desc.shape[2], desc.shape[3]],
        [desc.strides[0], desc.strides[1], desc.strides[2], 1],
        desc.block_type.shape,
        desc.layout,
    )


@gluon.jit
def sequence_half_bias(seqlen_k):
    """Half the default bias of a sequence of ``seqlen_k`` keys: -log(Sk) / 2, or 0 with no key."""
    return gl.where(seqlen_k > 0, -0.5 * gl.log(gl.maximum(seqlen_k, 1).to(gl.float32)), 0.0)


@gluon.jit
def store_rows(ptr, desc, value, start, r0, length, h, layout: gl.constexpr):
    """Register stores of a tile ``value`` [rows, D] (in ``layout``) of head h at the rows r0 + of a packed
    sequence that begins at token ``start``, but for the rows past its ``length`` (a TMA store would write
    the whole tile, over the next sequence's first rows). ``ptr`` is the tensor of the TMA descriptor
    ``desc``, whose strides address it."""
    stride_m, stride_h = desc.strides[1], desc.strides[2]
    ROWS_: gl.constexpr = value.shape[0]
    D: gl.constexpr = value.shape[1]
    row = r0 + gl.arange(0, ROWS_, layout=gl.SliceLayout(1, layout))
    col = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    offsets = (start + row).to(gl.int64)[:, None] * stride_m + h * stride_h + col[None, :]
    gl.store(ptr + offsets, value, mask=(row < length)[:, None] & (col < D)[None, :])
