"""What differs between the Triton releases the Gluon kernels support, in one place.

``hopper.py`` and ``hopper_bwd.py`` take from here the Gluon functions that were renamed or added between
Triton 3.6 and 3.9 (``SUPPORTED``, the pyproject's ``triton`` bounds), and what code generation made differ:
a formulation of the causal mask that spills nothing under 3.7 and 3.9. Each entry says which release changed
what. On Triton 3.6
every name here is the one the kernels were written with, so their PTX is what it was before this module
(``tests/test_triton_matrix.py`` compiles them under every supported release).
"""

from __future__ import annotations

import triton
from triton._C.libtriton import ir
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import tma

# [first, last] minor releases of Triton 3 that CI compiles the kernels with (pyproject.toml, README).
SUPPORTED = ((3, 6), (3, 9))
VERSION = tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:2])


def unsupported_triton(version: tuple[int, int] = VERSION) -> str | None:
    """Why the Gluon kernels do not run with this Triton release (None: they do). Outside ``SUPPORTED`` the
    Triton kernels serve the calls the Gluon ones would have (``host.unsupported_common``)."""
    if SUPPORTED[0] <= version <= SUPPORTED[1]:
        return None
    first, last = (".".join(map(str, v)) for v in SUPPORTED)
    return f"triton {'.'.join(map(str, version))}: the Gluon kernels are tested with {first} to {last}"


UNSUPPORTED_TRITON = unsupported_triton()


# TMA copies: 3.8 named them async_load and async_store (the old names became aliases); 3.9 removed the old
# names.
if hasattr(tma, "async_load"):
    async_load, async_store = tma.async_load, tma.async_store
else:
    async_load, async_store = tma.async_copy_global_to_shared, tma.async_copy_shared_to_global


@builtin
def _async_reduce_add(tensor_desc, coord, src, _semantic=None):
    # Gluon 3.6 and 3.7 have the TMA reduction in their IR builder (Triton uses it for a descriptor's
    # atomic_add) but not in their language.
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


# A TMA reduction (add) of a shared tile into global memory: 3.8 added it to the language, the same operation.
async_add = tma.async_atomic_add if hasattr(tma, "async_atomic_add") else _async_reduce_add

# Triton 3.7 computes the 16 key indices a forward consumer thread compares (k = j * BLOCK_N + its columns)
# ahead of the key loop and keeps them live across it: ptxas spills them (292 bytes, stored before the loop and
# reloaded in it) in the D64 four-group forward over packed sequences (causal, fp16), where 3.6, 3.8 and 3.9
# spill nothing. Comparing the tile's own columns against bounds moved by j * BLOCK_N instead
# (``hopper._probabilities``) spills nothing on 3.7; 3.6 keeps the form its PTX and the H100/H200
# measurements have. Triton 3.9 spills in the same specialisation (184 bytes in the consumers) and not with
# the tile-start form, which however makes its dense D64 causal forward spill 12 bytes: 3.9 takes it for
# packed sequences only.
MASK_FROM_TILE_START = gl.constexpr(VERSION == (3, 7))
PACKED_MASK_FROM_TILE_START = gl.constexpr(VERSION in ((3, 7), (3, 9)))
