"""Input checks for the public functions. Each error names the argument, what was expected and what was
given. Checks that read tensor values (cu_seqlens, cache_seqlens, block_table) run on CPU tensors; on a GPU
they would synchronise the host with the device in the hot path, so there they run only when the environment
variable SIGATTN_CHECK_VALUES=1 asks for them (for debugging), and never while a CUDA graph is being
captured or torch.compile is tracing, where values are unknown.
"""

from __future__ import annotations

import math
import numbers
import os

import torch
from torch import Tensor

from .ops.sigmoid_attn.dropout import threshold as dropout_threshold

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPE = torch.int32


def describe(x) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


CHECK_VALUES_ENV = "SIGATTN_CHECK_VALUES"


def values_checkable(device: torch.device | None = None) -> bool:
    """Whether tensor values may be read now: not during CUDA graph capture or torch.compile tracing, and,
    for tensors on ``device`` other than the CPU, only when $SIGATTN_CHECK_VALUES is 1 (reading them
    synchronises with the device)."""
    if torch.compiler.is_compiling():
        return False
    if device is not None and device.type != "cpu" and os.environ.get(CHECK_VALUES_ENV) != "1":
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_tensor(x, name: str, ndim: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {describe(x)}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(x.shape)}")


def check_qkv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    names: tuple[str, str, str],
    layouts: tuple[str, str],
    same_batch: bool = True,
) -> None:
    """q, k, v with matching dtype and device, q and k of one head dim (v may have its own: the output's),
    k and v of one shape but the head dim, Hq a multiple of Hkv, and (``same_batch``) one batch size in dim 0.

    The caller has checked ranks and moved heads to dim -2 (flash layout: ..., S, H, D)."""
    nq, nk, nv = names
    for t, n in zip((q, k, v), names, strict=True):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{n} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for t, n in ((k, nk), (v, nv)):
        if t.dtype != q.dtype:
            raise TypeError(f"{n} must have the dtype of {nq} ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{n} must be on the device of {nq} ({q.device}), got {t.device}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"{nk} and {nv} must have the same shape {layouts[1]} but the head dim (v's may differ), got "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    if same_batch and q.shape[0] != k.shape[0]:
        raise ValueError(f"{nk} must have the batch size of {nq} ({q.shape[0]}), got {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{nk} must have the head dim of {nq} ({q.shape[-1]}), got {k.shape[-1]}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads ({hq}, {nq}) must be a multiple of the number of key/value heads ({hkv}, {nk})"
        )
    for t, n in ((q, nq), (v, nv)):
        if t.shape[-1] == 0:
            raise ValueError(f"head dim must be at least 1, got {n} of shape {tuple(t.shape)}")


def check_scale(scale, name: str = "scale") -> None:
    """None, or a finite positive number: a scale of 0 makes every weight sigmoid(bias), a negative one
    inverts the attention; neither is a model anyone trains, so both are taken for mistakes. ``name`` is the
    argument's name in the call (flash-attn's ``softmax_scale`` is accepted for ``scale``)."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a float or None, got {describe(scale)}")
    # (torch.compile may trace a number symbolically, as it does a model's scale under dynamic shapes.)
    if not torch.compiler.is_compiling() and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name} must be a finite number > 0 (or None for 1 / sqrt(headdim)), got {scale!r}")


def check_dropout_p(dropout_p) -> None:
    """``dropout_p``: a real number in [0, 1) (1 would drop every weight and scale the rest by 1 / 0), 0 or
    within the resolution of the 16-bit draws (``ops.sigmoid_attn.dropout``): a p that rounds to 0 in 2^-16
    steps would drop nothing."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {describe(dropout_p)}")
    if not 0 <= dropout_p < 1:  # NaN fails this too
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if dropout_p > 0 and dropout_threshold(dropout_p) == 0:
        raise ValueError(
            f"dropout_p={dropout_p!r} is below the resolution of attention dropout's 16-bit draws and would drop "
            f"nothing: use 0, or a p of at least 2^-16 ({2.0**-16:.3g})"
        )


def check_bias(bias, num_heads: int, q: Tensor) -> None:
    """None, a finite float, or a floating-point (Hq,) tensor on q's device whose values are finite (read
    only where ``values_checkable``: on a GPU that would synchronise)."""
    if bias is None:
        return
    if isinstance(bias, Tensor):
        if bias.shape != (num_heads,):
            raise ValueError(
                f"bias must be a float or a tensor of shape (Hq,) = ({num_heads},), got shape {tuple(bias.shape)}"
            )
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
        if bias.device != q.device:
            raise ValueError(f"bias must be on the device of the query ({q.device}), got {bias.device}")
        if values_checkable(bias.device) and not bool(torch.isfinite(bias.detach()).all()):
            raise ValueError(f"bias must be finite, got {bias.detach().tolist()}")
        return
    if isinstance(bias, bool) or not isinstance(bias, numbers.Real):
        raise TypeError(f"bias must be a float, a tensor of shape (Hq,) or None, got {describe(bias)}")
    if not torch.compiler.is_compiling() and not math.isfinite(bias):
        raise ValueError(f"bias must be finite (an infinite bias makes every weight 0 or 1), got {bias!r}")


def check_window(window_size, longest: int) -> tuple[int, int]:
    """(left, right) with -1 for an unbounded side. A bound of at least ``longest`` (the most queries or keys
    any sequence of the call can have) excludes no key, so it becomes -1: the masks then never compute
    with it, and ``sys.maxsize`` cannot overflow their int64 (PyTorch) or int32 (kernel) arithmetic."""
    ok = isinstance(window_size, (tuple, list)) and len(window_size) == 2
    if not ok or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {describe(window_size)}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 means unbounded), got {(left, right)}")
    return tuple(-1 if w >= longest else w for w in (left, right))


def check_alibi(alibi_slopes, batch: int, num_heads: int, q: Tensor) -> None:
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, Tensor):
        raise TypeError(
            f"alibi_slopes must be a float32 tensor of shape (Hq,) or (B, Hq), got {describe(alibi_slopes)}"
        )
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    # Two comparisons, not ``in``: torch.compile (2.13) finds a static shape in a tuple of symbolic ones
    # (dynamic=True, slopes of a module's buffer) nowhere, though == compares them.
    if alibi_slopes.shape != (num_heads,) and alibi_slopes.shape != (batch, num_heads):
        raise ValueError(
            f"alibi_slopes must have shape (Hq,) = ({num_heads},) or (B, Hq) = ({batch}, {num_heads}), "
            f"got {tuple(alibi_slopes.shape)}"
        )
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes must be on the device of the query ({q.device}), got {alibi_slopes.device}")
    if alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes must not require grad: ALiBi slopes are fixed, no gradient is computed for them")
    if values_checkable(alibi_slopes.device) and not bool(torch.isfinite(alibi_slopes).all()):
        raise ValueError(f"alibi_slopes must be finite, got {alibi_slopes.tolist()}")


def check_flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")


def check_index_vector(x, name: str, length: int | None, device: torch.device) -> None:
    """A 1-D int32 tensor on ``device`` (of ``length`` entries when given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be an int32 tensor, got {describe(x)}")
    if x.dtype != INDEX_DTYPE:
        raise TypeError(f"{name} must be int32, got {x.dtype}")
    if x.dim() != 1 or (length is not None and x.shape[0] != length):
        want = f"({length},)" if length is not None else "1-D"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on the device of the query ({device}), got {x.device}")


def check_cu_seqlens(cu: Tensor, name: str, total: int, max_seqlen, max_name: str, device) -> None:
    check_index_vector(cu, name, None, device)
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have batch + 1 >= 1 entries, got shape {tuple(cu.shape)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise TypeError(f"{max_name} must be a non-negative int, got {describe(max_seqlen)}")
    if not values_checkable(cu.device):
        return
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:], strict=True)]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the total number of tokens ({total}), got {values[-1]}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence in {name} ({max(lengths)})")


def check_attn_mask(attn_mask, target: tuple[int, int, int, int], query: Tensor) -> None:
    if attn_mask is None:
        return
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a bool or float tensor, got {describe(attn_mask)}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(
            f"attn_mask must be bool (True = attend) or floating point (added to logits), got {attn_mask.dtype}"
        )
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask must be on the device of query ({query.device}), got {attn_mask.device}")
    try:
        ok = torch.broadcast_shapes(attn_mask.shape, target) == torch.Size(target) and attn_mask.dim() <= 4
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask must broadcast to (B, Hq, Sq, Sk) = {target}, got shape {tuple(attn_mask.shape)}")
