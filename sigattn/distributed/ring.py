"""Ring attention: each rank keeps its queries while the K/V shards travel around the ring.

Sigmoid attention is a plain sum over keys, ``out_i = sum_j sigmoid(z_ij) v_j``, so attention over the
whole sequence is the sum of attention over each key shard: the partial outputs add (in float32, or
float64 for float64 inputs), with no log-sum-exp rescaling as softmax ring attention needs.

Forward, on rank r of N: at step s = 0 .. N-1 it holds the K/V shard of rank ``src = (r - s) mod N``. It
posts the send of that shard to rank r + 1 and the receive of the next one from rank r - 1
(``batch_isend_irecv``), computes its queries against the shard it holds, then waits.

Backward: the K/V shards travel the same way again, each with a float32 dK/dV accumulator. At step s
rank r adds its queries' contribution to the accumulator of the shard it holds and passes both on; after
step N - 1 one more hop brings every accumulator home, holding the contributions of all N ranks. The
accumulator's hop is posted after the step's compute and waited for after the next step's, so it
overlaps that compute. dQ and the per-head bias gradient stay local.

Which (query rows, key rows) pieces a step computes, and with which mask, is ``ring_step_pieces``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..backends import AttnCall, Backend, select_backend
from ..ops.sigmoid_attn.reference import Mask
from .checks import ShardedCall, check_sharded_call

_TAG_KV, _TAG_DKV = 0, 1  # gloo matches messages by tag; NCCL ignores tags and matches in order


@dataclass(frozen=True)
class Piece:
    """Queries ``q_rows`` of the local shard against keys ``k_rows`` of the visiting shard. ``causal``: the
    two row ranges hold the same global positions, so the piece takes the causal mask (Sq == Sk, so its
    top-left and bottom-right alignments agree); otherwise every query sees every key."""

    q_rows: slice
    k_rows: slice
    causal: bool


def ring_step_pieces(rank: int, src: int, seqlen_local: int, *, causal: bool, load_balance: bool) -> list[Piece]:
    """The pieces rank ``rank`` computes against the K/V shard of rank ``src``.

    Contiguous shards (chunk i = rank i's shard): src < rank is wholly in the past, src == rank is the
    diagonal, src > rank wholly in the future (skipped: no compute, but the shard still passes on).

    Zig-zag shards: rank r holds chunks a = r and b = 2N-1-r, in that order, each of c = S_local / 2 rows;
    the shard of src holds chunks j = src and 2N-1-j. Chunk a < N <= every b, so:

        src == r   a x a diagonal, b x a full, b x b diagonal, a x b never: the local causal mask
        src <  r   a x j full, b x j full, (2N-1-j) is after both: all queries x the first half of keys
        src >  r   j is after a but before b, 2N-1-j is before b: the second half of queries x all keys

    So every off-diagonal step is exactly half a full block on every rank: balanced.
    """
    full = slice(0, seqlen_local)
    if not causal:
        return [Piece(full, full, False)]
    if src == rank:
        return [Piece(full, full, True)]
    if not load_balance:
        return [Piece(full, full, False)] if src < rank else []
    half = seqlen_local // 2
    if src < rank:
        return [Piece(full, slice(0, half), False)]
    return [Piece(slice(half, seqlen_local), full, False)]


class _LocalAttention:
    """Forward and backward of one piece on ``backend`` (``select_local_backend``), with results in the
    accumulation dtype: a float16/bfloat16 partial output or gradient rounded to its dtype before the sum
    would add one rounding per step (with that, the bf16 Triton cases of tests/test_distributed.py failed
    the 2x tolerance rule: output error 0.064 against 2 x 0.019 on 2 ranks). The Triton kernels are driven
    through their launchers, which store into float32 buffers and whose backward needs nothing from the
    forward; the PyTorch backends get float32 copies of half-precision inputs (they compute in float32
    anyway) and go through autograd, recomputing the piece's forward in the backward."""

    def __init__(self, q: Tensor, cp: ShardedCall, backend: Backend):
        self.cp = cp
        self.acc = _accumulation_dtype(q.dtype)
        self.backend = backend
        self.flash = backend.name == "triton"

    def _call(self, q, k, v, bias, causal) -> AttnCall:
        return AttnCall("dense", q, k, v, self.cp.scale, bias, Mask(causal), None, False)

    def _params(self, causal: bool):
        from ..ops.sigmoid_attn.params import Params

        return Params(self.cp.scale, Mask(causal))

    def _empty(self, like: Tensor) -> Tensor:
        return torch.empty(like.shape, dtype=self.acc, device=like.device)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        if self.flash:
            from ..ops.sigmoid_attn import kernels

            return kernels.forward(q, k, v, self._params(causal), self.cp.bias, out=self._empty(q))
        q, k, v = (t.to(self.acc) for t in (q, k, v))
        return self.backend(self._call(q, k, v, self.cp.bias, causal))

    def backward(self, do: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool):
        """(dq, dk, dv, dbias or None) of the piece for the output gradient ``do``."""
        if self.flash:
            from ..ops.sigmoid_attn import kernels

            grads = tuple(self._empty(t) for t in (q, k, v))
            return kernels.backward(do, q, k, v, self._params(causal), self.cp.bias, grads=grads)
        with torch.enable_grad():
            inputs = [t.detach().to(self.acc).requires_grad_() for t in (q, k, v)]
            bias = self.cp.bias
            if isinstance(bias, Tensor):
                bias = bias.detach().requires_grad_()
                inputs.append(bias)
            out = self.backend(self._call(*inputs[:3], bias, causal))
            grads = torch.autograd.grad(out, inputs, do.to(self.acc))
        return (*grads[:3], grads[3] if len(grads) == 4 else None)


def select_local_backend(q: Tensor, k: Tensor, v: Tensor, cp: ShardedCall) -> Backend:
    """The backend the dispatcher picks for this rank's pieces (``use_backend`` and ``SIGATTN_BACKEND``
    apply), chosen once, in the forward: the backward runs on the same one, as single-process attention's
    does, though the caller's ``use_backend`` block may have ended by then (and the autograd engine may run
    the backward on another thread, where the block is not in force)."""
    return select_backend(AttnCall("dense", q, k, v, cp.scale, cp.bias, Mask(cp.causal), None, False))


class _Ring:
    """Point-to-point exchanges with the ring neighbours: send to rank + 1, receive from rank - 1."""

    def __init__(self, cp: ShardedCall):
        self.group = cp.group
        self.next = self._global_rank((cp.rank + 1) % cp.world_size)
        self.prev = self._global_rank((cp.rank - 1) % cp.world_size)

    def _global_rank(self, group_rank: int) -> int:
        # P2POp takes global ranks (``group_peer`` needs a newer torch than this package requires).
        if self.group is None or self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def start(self, send: Tensor, recv: Tensor, tag: int) -> list:
        """Posts the exchange and returns its requests; ``send`` must not change, nor ``recv`` be read,
        before they are waited for."""
        ops = [
            dist.P2POp(dist.isend, send, self.next, group=self.group, tag=tag),
            dist.P2POp(dist.irecv, recv, self.prev, group=self.group, tag=tag),
        ]
        return dist.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pieces(cp: ShardedCall, step: int, seqlen_local: int) -> list[Piece]:
    src = (cp.rank - step) % cp.world_size
    return ring_step_pieces(cp.rank, src, seqlen_local, causal=cp.causal, load_balance=cp.load_balance)


def ring_forward(q: Tensor, k: Tensor, v: Tensor, cp: ShardedCall, backend: Backend) -> Tensor:
    """This rank's output shard; no autograd. q (B, S_local, Hq, D), k and v (B, S_local, Hkv, D)."""
    local = _LocalAttention(q, cp, backend)
    ring = _Ring(cp)
    kv = torch.stack((k, v))  # [2, B, S_local, Hkv, D]: what travels
    kv_next = torch.empty_like(kv)
    out = torch.zeros(q.shape, dtype=_accumulation_dtype(q.dtype), device=q.device)
    for step in range(cp.world_size):
        pending = ring.start(kv, kv_next, _TAG_KV) if step < cp.world_size - 1 else []
        for p in _pieces(cp, step, q.shape[1]):
            out[:, p.q_rows] += local.forward(q[:, p.q_rows], kv[0][:, p.k_rows], kv[1][:, p.k_rows], p.causal)
        _wait(pending)
        kv, kv_next = kv_next, kv
    return out.to(q.dtype)


def ring_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, cp: ShardedCall, backend: Backend):
    """(dq, dk, dv, dbias or None) of this rank's shards, on the forward's ``backend``; no autograd. dbias
    holds only this rank's queries' contribution (see ``ring_sigmoid_attn``)."""
    local = _LocalAttention(q, cp, backend)
    ring = _Ring(cp)
    acc = _accumulation_dtype(q.dtype)
    kv = torch.stack((k, v))
    kv_next = torch.empty_like(kv)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dbias = torch.zeros(q.shape[2], dtype=acc, device=q.device) if cp.head_bias is not None else None
    dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # the visiting shard's gradient so far
    dkv_next = torch.empty_like(dkv)
    dkv_pending = []
    for step in range(cp.world_size):
        kv_pending = ring.start(kv, kv_next, _TAG_KV) if step < cp.world_size - 1 else []
        piece_grads = []
        for p in _pieces(cp, step, q.shape[1]):
            dq_p, dk_p, dv_p, dbias_p = local.backward(
                do[:, p.q_rows], q[:, p.q_rows], kv[0][:, p.k_rows], kv[1][:, p.k_rows], p.causal
            )
            dq[:, p.q_rows] += dq_p
            if dbias is not None:
                dbias += dbias_p
            piece_grads.append((p.k_rows, dk_p, dv_p))
        if step > 0:  # the accumulator of the shard now held, from the ranks it visited before
            _wait(dkv_pending)
            dkv, dkv_next = dkv_next, dkv
        for rows, dk_p, dv_p in piece_grads:
            dkv[0][:, rows] += dk_p
            dkv[1][:, rows] += dv_p
        if cp.world_size > 1:  # on to the next rank; after the last step, home to the shard's owner
            dkv_pending = ring.start(dkv, dkv_next, _TAG_DKV)
        _wait(kv_pending)
        kv, kv_next = kv_next, kv
    if cp.world_size > 1:
        _wait(dkv_pending)
        dkv = dkv_next
    dbias = dbias.to(cp.head_bias.dtype) if dbias is not None else None
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), dbias


class _RingSigmoidAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, head_bias, cp: ShardedCall):
        ctx.save_for_backward(q, k, v, head_bias)
        ctx.cp = cp
        ctx.backend = select_local_backend(q, k, v, cp)
        return ring_forward(q, k, v, cp, ctx.backend)

    @staticmethod
    @once_differentiable  # the ring's backward has no derivative: a double backward raises, not drops it
    def backward(ctx, grad_out):
        q, k, v, head_bias = ctx.saved_tensors
        cp = ctx.cp
        if head_bias is not None:  # the saved tensor, not the caller's: same values, no autograd history
            cp = dataclasses.replace(cp, bias=head_bias)
        # One copy here rather than one per piece when autograd hands an expanded gradient (out.sum()).
        dq, dk, dv, dbias = ring_backward(grad_out.contiguous(), q, k, v, cp, ctx.backend)
        return dq, dk, dv, dbias, None


def ring_sigmoid_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    causal: bool = False,
    bias: float | Tensor | None = None,
    scale: float | None = None,
    load_balance: bool = False,
) -> Tensor:
    """Sigmoid attention over a sequence sharded across ``group`` (default: the world), by ring attention.

    Args:
        q: (batch, seqlen_local, nheads, headdim), this rank's queries.
        k, v: (batch, seqlen_local, nheads_k, headdim), this rank's keys and values; nheads a multiple of
            nheads_k (GQA/MQA). Every rank passes shards of the same shape, dtype and options.
        group: the context-parallel process group; every member must call this function (and, in the
            backward, run backward through it) together.
        causal: causal mask over the whole sequence (query at global position i sees keys j <= i).
        bias: a float; a (nheads,) per-head tensor; or None for ``-log(S)``, S = world_size * seqlen_local
            the *whole* sequence's length, as single-process ``sigmoid_attn_func`` on the full sequence.
        scale: logit scale; default ``1 / sqrt(headdim)``.
        load_balance: False: rank r holds the r-th contiguous chunk of the sequence. True: the zig-zag
            layout of ``sigattn.distributed.sharding`` (chunks r and 2N-1-r), which gives every rank the
            same causal work; seqlen_local must be even.

    Returns:
        (batch, seqlen_local, nheads, headdim): this rank's shard of the output, in q's dtype. Partial
        outputs are summed in float32 (float64 for float64 inputs).

    Gradients: dq, dk and dv are the full gradients of this rank's shards (dK/dV travel back to their
    owner). A per-head bias tensor is replicated on every rank, and its gradient on each rank is only this
    rank's queries' share, like the gradient of any replicated weight in a context-parallel model (the
    q/k/v projections too): summing the gradients over the group, as data-parallel gradient reduction
    over the ranks of the group does, gives the single-process gradient.
    """
    cp = check_sharded_call(
        "ring_sigmoid_attn", q, k, v, group, causal=causal, bias=bias, scale=scale, load_balance=load_balance
    )
    return _RingSigmoidAttn.apply(q, k, v, cp.head_bias, cp)
