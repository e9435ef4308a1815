"""The tolerance rule, flash-attention's, written once for every check of the project.

For the output and every gradient, as maximum absolute errors against the float64 reference (the truth):

    error(ours) <= 2 * error(PyTorch in the same precision) + term

PyTorch's error is that of the reference computed in the inputs' own precision (``upcast=False``). The term
covers what both may get exactly right or wrong by one rounding; it comes in three named variants:

* ``rounding_term``: eps(dtype) * max|truth|, the final cast of a float32 accumulator to the output dtype.
  The GPU grid (``python -m sigattn.testing.grid``), whose kernels accumulate in float32.
* ``ATOL[dtype]``: a fixed absolute term, for values both get exactly right. The CPU tests
  (tests/conftest.py) and ``sigattn example``.
* ``sharded_term``: ``ATOL`` in float32 and float64, where a context-parallel result rounds nothing at the
  end and differs from the reference only in the order of summation (partial sums per ring step and rank),
  else ``rounding_term``. The context-parallel grid (``sigattn.testing.distributed``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The absolute term per dtype. In float32 the per-head bias gradient of a context-parallel run (a sum over
# every query and key) differs from the reference by a few ulps (8e-6 against 2 x 2.5e-6 + eps * 25 on 2
# ranks, ring, zig-zag causal MQA): 1e-5 covers it.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def max_error(x: Tensor, truth: Tensor) -> float:
    """max|x - truth| in float64 (0 for empty tensors); a NaN anywhere counts as an infinite error."""
    err = (x.double() - truth.double()).abs().max().item() if x.numel() else 0.0
    return math.inf if math.isnan(err) else err


def allowed_error(pytorch_error: float, term: float) -> float:
    """The rule: twice PyTorch's error in the same precision, plus ``term``."""
    return 2 * pytorch_error + term


def rounding_term(truth: Tensor, dtype: torch.dtype) -> float:
    """eps(dtype) * max|truth|: one rounding of the result to ``dtype`` (0 for an empty truth)."""
    return torch.finfo(dtype).eps * (truth.abs().max().item() if truth.numel() else 0.0)


def sharded_term(truth: Tensor, dtype: torch.dtype) -> float:
    """``ATOL[dtype]`` in float32 and float64 (another order of summation, no final rounding), else
    ``rounding_term``."""
    if dtype in (torch.float32, torch.float64):
        return ATOL[dtype]
    return rounding_term(truth, dtype)
