"""Input checks shared by ring and Ulysses attention, and the description of one validated call.

Local checks come first (types, shapes, options), with the errors of ``sigattn.validation``. Then one
small all-gather compares every rank's shapes and options: shards of different lengths, head counts,
dtypes or flags across ranks would otherwise hang in a send or receive of the wrong size, or compute the
wrong function silently. Every rank gets the same gathered table and so raises the same error; a rank
whose local checks fail still joins the all-gather (with a row saying so) before raising its own error, so
that the ranks waiting there raise too instead of hanging. The
all-gather costs one round trip (and, on CUDA, one host synchronisation) per call; it is skipped while
torch.compile traces or a CUDA graph is captured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .. import validation as check

# The fields every rank must agree on, in the order they are gathered.
_AGREED = ("batch", "seqlen_local", "heads", "kv_heads", "headdim", "dtype", "causal", "load_balance", "bias")
_BIAS_KIND = {"none": 0, "float": 1, "tensor": 2}


@dataclass(frozen=True)
class ShardedCall:
    """One validated context-parallel call: the group, this rank, and the options resolved for the whole
    sequence. ``bias`` is a float (``-log`` of the global key length when the caller gave None) or the
    per-head (Hq,) tensor."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    seqlen: int  # of the whole sequence: world_size * the local shard's length
    scale: float
    bias: float | Tensor
    causal: bool
    load_balance: bool

    @property
    def head_bias(self) -> Tensor | None:
        return self.bias if isinstance(self.bias, Tensor) else None


def check_sharded_call(fn: str, q, k, v, group, *, causal, bias, scale, load_balance) -> ShardedCall:
    """Validates ``fn``'s arguments on this rank and against the other ranks of ``group``."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fn} needs torch.distributed: call torch.distributed.init_process_group first")
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the group passed to {fn}")
    agree = check.values_checkable()
    try:
        _check_local(fn, q, k, v, causal, bias, scale, load_balance)
    except (TypeError, ValueError):
        # The other ranks may have passed their local checks and be waiting in the all-gather: this rank
        # joins it with a failed row, so that they raise too instead of hanging.
        if agree:
            _check_ranks_agree(fn, q, k, group, world_size, causal, bias, load_balance, passed=False)
        raise
    if agree:
        _check_ranks_agree(fn, q, k, group, world_size, causal, bias, load_balance)

    seqlen = world_size * q.shape[1]
    if bias is None:
        # The whole sequence's key count: each rank's queries see keys of every shard.
        bias = -math.log(seqlen) if seqlen > 0 else 0.0
    elif not isinstance(bias, Tensor):
        bias = float(bias)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return ShardedCall(group, rank, world_size, seqlen, scale, bias, causal, load_balance)


def _check_local(fn, q, k, v, causal, bias, scale, load_balance) -> None:
    layout = "(batch, seqlen_local, nheads, headdim)"
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        check.check_tensor(t, n, 4, layout)
    check.check_qkv(q, k, v, ("q", "k", "v"), ("(B, S_local, Hq, D)", "(B, S_local, Hkv, D)"))
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{fn} needs v's head dim to be q's and k's ({q.shape[-1]}): the shards of k and v travel as one "
            f"tensor; got v of shape {tuple(v.shape)}"
        )
    if k.shape[1] != q.shape[1]:
        raise ValueError(
            f"k must have the local sequence length of q ({q.shape[1]}): {fn} is self-attention over one "
            f"sharded sequence, each rank holding the same tokens' q, k and v; got k of shape {tuple(k.shape)}"
        )
    check.check_bias(bias, q.shape[2], q)
    check.check_scale(scale)
    check.check_flag(causal, "causal")
    check.check_flag(load_balance, "load_balance")
    if load_balance and q.shape[1] % 2 != 0:
        raise ValueError(
            f"load_balance=True (zig-zag) gives each rank two chunks of the sequence: the local sequence length "
            f"(q's dim 1) must be even, got {q.shape[1]}"
        )


def _check_ranks_agree(fn, q, k, group, world_size, causal, bias, load_balance, passed=True) -> None:
    """All-gathers this rank's row and raises if another rank failed its local checks or the rows differ.
    ``passed=False``: this rank failed its own, and raises its error after this; it sends no fields."""
    if passed:
        kind = "none" if bias is None else "tensor" if isinstance(bias, Tensor) else "float"
        dtype = list(check.FLOAT_DTYPES).index(q.dtype)
        mine = [1, *q.shape[:3], k.shape[2], q.shape[3], dtype, causal, load_balance, _BIAS_KIND[kind]]
    else:
        mine = [0] * (1 + len(_AGREED))
    local = torch.tensor(mine, dtype=torch.int64, device=_collective_device(group, q))
    table = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(table, local, group=group)
    rows = torch.stack(table).tolist()  # [world_size, 1 + len(_AGREED)]: passed its local checks, then the fields
    if not passed:
        return
    failed = [r for r, row in enumerate(rows) if not row[0]]
    if failed:
        raise ValueError(
            f"{fn}: the arguments of rank(s) {failed} of the group failed their checks (their error says which); "
            f"every rank must pass valid shards of one sequence"
        )
    dtypes = list(check.FLOAT_DTYPES)
    for i, field in enumerate(_AGREED, start=1):
        values = [row[i] for row in rows]
        if len(set(values)) == 1:
            continue
        if field == "dtype":
            values = [str(dtypes[x]) for x in values]
        elif field == "bias":
            values = [next(name for name, code in _BIAS_KIND.items() if code == x) for x in values]
        elif field in ("causal", "load_balance"):
            values = [bool(x) for x in values]
        raise ValueError(
            f"{fn}: every rank of the group must pass the same {_DESCRIBE[field]}, got {values} on ranks "
            f"0..{world_size - 1}"
        )


def _collective_device(group, q) -> torch.device:
    """The device of the all-gather's tensors: the CPU for gloo, else q's (CUDA for NCCL), or the current
    CUDA device where q is no tensor (a rank whose arguments failed their checks)."""
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return q.device if isinstance(q, Tensor) else torch.device("cuda", torch.cuda.current_device())


_DESCRIBE = {
    "batch": "batch size (q's dim 0)",
    "seqlen_local": "local sequence length (q's dim 1: the shards must all be S / world_size tokens long)",
    "heads": "number of query heads (q's dim 2)",
    "kv_heads": "number of key/value heads (k's dim 2)",
    "headdim": "head dim (q's dim 3)",
    "dtype": "dtype of q, k and v",
    "causal": "causal flag",
    "load_balance": "load_balance flag",
    "bias": "kind of bias (None, a float or a per-head tensor)",
}
