"""``SigmoidAttention``: the inner attention of torchtitan's ``GQAttention``, computed by sigattn.

torchtitan (0.3) builds every attention layer as ``GQAttention`` (projections, optional QK-norm, RoPE,
output projection) around an *inner attention* chosen by config (``FlexAttention``, ``VarlenAttention``,
``ScaledDotProductAttention``). ``SigmoidAttention.Config`` is one more such config. It extends
``VarlenAttention.Config`` on purpose: the trainer asks the model for attention masks only when the
inner attention is a Flex or Varlen config, and then the model answers (``SigmoidLlama3Model``):

    attention_masks            the call
    None                       sigmoid_attn_func(q, k, v, causal=..., window_size=...)   dense, (B, L, H, D)
    VarlenMetadata             sigmoid_attn_varlen_func on (B * L, H, D) with its cu_seqlens: each packed
                               document attends only to itself
    context parallel bound     ring_sigmoid_attn / ulysses_sigmoid_attn over the CP group (dense causal)

GQA is passed unexpanded (``enable_gqa`` is implied by the head counts). The bias is one constant of the
model, ``Config.bias``, resolved once when the model config meets the training config (``-log`` of
``training.seq_len`` unless set): an unresolved bias is an error, never a per-call ``-log(L)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch.distributed as dist
from torch import Tensor
from torchtitan.models.common.attention import VarlenAttention, VarlenMetadata
from torchtitan.protocols.module import Module

from ...distributed import ring_sigmoid_attn, ulysses_sigmoid_attn
from ...functional import sigmoid_attn_func, sigmoid_attn_varlen_func

ContextParallelMethod = Literal["ring", "ulysses"]
CONTEXT_PARALLEL_METHODS: tuple[str, ...] = ("ring", "ulysses")


def window_to_mask(window_size: tuple[int, int]) -> tuple[bool, tuple[int, int]]:
    """torchtitan's ``window_size=(left, right)`` as sigattn's ``(causal, window_size)``.

    torchtitan spells causal as ``(-1, 0)`` and full attention as ``(-1, -1)``; sigattn (flash-attn's
    convention) has a ``causal`` flag and an unbounded window ``(-1, -1)``. ``(W, 0)`` is a causal sliding
    window of W keys before the query; any other ``(left, right)`` is a two-sided window.
    """
    if (
        not isinstance(window_size, tuple | list)
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    ):
        raise ValueError(
            "window_size must be a pair (left, right) of ints >= -1 (-1: unbounded; (-1, 0) is causal), "
            f"got {window_size!r}"
        )
    left, right = int(window_size[0]), int(window_size[1])
    causal = right == 0
    if causal:
        return True, (left, 0) if left >= 0 else (-1, -1)
    return False, (left, right)


def check_bias(bias: Any) -> float:
    """The bias as a finite float; a clear error for anything else (``None`` included: unresolved)."""
    if bias is None:
        raise ValueError(
            "SigmoidAttention.Config.bias is None (unresolved): set it, or build the model through "
            "SigmoidLlama3Model.Config.update_from_config (the trainer does), which sets -log(training.seq_len), "
            "or call resolve_sigmoid_bias(model_config, seq_len)"
        )
    if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias):
        raise ValueError(f"SigmoidAttention.Config.bias must be a finite float, got {bias!r}")
    return float(bias)


class SigmoidAttention(Module):
    """Inner attention ``sigmoid(scale * q k^T + bias) v`` for torchtitan's ``GQAttention``.

    Inputs and output are (B, L, H, D), as every torchtitan inner attention; k and v may have fewer heads
    (GQA). See the module docstring for which sigattn function serves which call.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(VarlenAttention.Config):
        bias: float | None = None
        """The sigmoid bias b, one constant for training and evaluation at any length. None: -log of the
        training context (``training.seq_len``), filled in by ``SigmoidLlama3Model.Config.update_from_config``."""

        context_parallel_method: ContextParallelMethod = "ring"
        """With ``parallelism.context_parallel_degree > 1``: ``ring`` (K/V shards circulate, any head count)
        or ``ulysses`` (all-to-all to head shards; query heads a multiple of the CP degree)."""

        context_parallel_load_balance: bool = True
        """The sequence layout of the CP shards: True is torchtitan's ``headtail`` load balancer (rank r holds
        chunks r and 2N-1-r, sigattn's zig-zag), False contiguous chunks. Set by ``update_from_config`` from
        ``parallelism.context_parallel_load_balancer``."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.bias = check_bias(config.bias)
        self.causal, self.window_size = window_to_mask(tuple(config.window_size))
        if config.context_parallel_method not in CONTEXT_PARALLEL_METHODS:
            raise ValueError(
                f"context_parallel_method must be one of {', '.join(map(repr, CONTEXT_PARALLEL_METHODS))}, "
                f"got {config.context_parallel_method!r}"
            )
        self.context_parallel_method = config.context_parallel_method
        self.context_parallel_load_balance = bool(config.context_parallel_load_balance)
        self.context_parallel_group: dist.ProcessGroup | None = None

    def bind_context_parallel(self, group: dist.ProcessGroup, *, load_balance: bool | None = None) -> None:
        """Run this attention over the sequence shards of ``group`` (ring or Ulysses) from now on.

        Args:
            group: the context-parallel process group (torchtitan's ``cp`` mesh dimension).
            load_balance: the shards' layout (zig-zag or contiguous); None keeps the config's.
        """
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
        if self.window_size != (-1, -1):
            raise ValueError(
                f"context parallel runs causal or full attention over the whole sequence; a sliding window "
                f"(window_size={self.window_size}) is not supported with context_parallel_degree > 1"
            )
        if load_balance is not None:
            if not isinstance(load_balance, bool):
                raise TypeError(f"load_balance must be a bool or None, got {load_balance!r}")
            self.context_parallel_load_balance = load_balance
        self.context_parallel_group = group

    def parallelize(self, parallel_dims: Any) -> None:
        """torchtitan's ``Module.parallelize``: binds the ``cp`` mesh's group when CP is enabled."""
        if getattr(parallel_dims, "cp_enabled", False):
            self.bind_context_parallel(parallel_dims.get_mesh("cp").get_group())
        super().parallelize(parallel_dims)

    def forward(
        self,
        q_BLNH: Tensor,
        k_BLNH: Tensor,
        v_BLNH: Tensor,
        *,
        attention_masks: VarlenMetadata | None = None,
        scale: float | None = None,
        out_transform: Callable[[Tensor, Tensor], Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """q (B, L, Hq, D), k and v (B, L, Hkv, D) -> (B, L, Hq, D).

        ``attention_masks``: None (dense) or torchtitan's ``VarlenMetadata`` (packed documents). ``scale``:
        the logit scale (None: 1/sqrt(D)). ``enable_gqa`` and other keyword arguments torchtitan passes are
        implied by the shapes. ``out_transform`` (an epilogue on the softmax log-sum-exp) has no meaning for
        sigmoid attention and raises.
        """
        if out_transform is not None:
            raise NotImplementedError(
                "out_transform (an epilogue on softmax's log-sum-exp) has no counterpart in sigmoid attention, "
                "which has no normaliser; SigmoidAttention does not take it"
            )
        if self.context_parallel_group is not None:
            return self._context_parallel(q_BLNH, k_BLNH, v_BLNH, attention_masks, scale)
        if attention_masks is None:
            return sigmoid_attn_func(
                q_BLNH, k_BLNH, v_BLNH, bias=self.bias, scale=scale, causal=self.causal, window_size=self.window_size
            )
        if not isinstance(attention_masks, VarlenMetadata):
            raise TypeError(
                f"attention_masks must be None or torchtitan's VarlenMetadata (packed documents), "
                f"got {type(attention_masks).__name__}"
            )
        batch, seqlen = q_BLNH.shape[:2]
        q, k, v = (t.reshape(batch * seqlen, t.shape[2], t.shape[3]) for t in (q_BLNH, k_BLNH, v_BLNH))  # [T, H, D]
        out = sigmoid_attn_varlen_func(
            q,
            k,
            v,
            attention_masks.cu_seq_q,
            attention_masks.cu_seq_k,
            attention_masks.max_q,
            attention_masks.max_k,
            bias=self.bias,
            scale=scale,
            causal=self.causal,
            window_size=self.window_size,
        )  # [T, Hq, D]
        return out.view(batch, seqlen, out.shape[1], out.shape[2])

    def _context_parallel(
        self, q: Tensor, k: Tensor, v: Tensor, attention_masks: VarlenMetadata | None, scale: float | None
    ) -> Tensor:
        if attention_masks is not None:
            raise ValueError(
                "attention_masks must be None under context parallel: ring and Ulysses attention run causal "
                "attention over the whole sharded sequence, not per packed document (SigmoidLlama3Model builds "
                f"no masks for single-document rows); got {type(attention_masks).__name__}"
            )
        fn = ring_sigmoid_attn if self.context_parallel_method == "ring" else ulysses_sigmoid_attn
        return fn(
            q,
            k,
            v,
            self.context_parallel_group,
            causal=self.causal,
            bias=self.bias,
            scale=scale,
            load_balance=self.context_parallel_load_balance,
        )


def sigmoid_attention_config(
    *,
    bias: float | None = None,
    window_size: tuple[int, int] = (-1, 0),
    context_parallel_method: ContextParallelMethod = "ring",
) -> SigmoidAttention.Config:
    """A ``SigmoidAttention.Config`` (torchtitan's ``get_attention_config`` counterpart), checked now."""
    if bias is not None:
        check_bias(bias)
    window_to_mask(window_size)
    if context_parallel_method not in CONTEXT_PARALLEL_METHODS:
        raise ValueError(
            f"context_parallel_method must be one of {', '.join(map(repr, CONTEXT_PARALLEL_METHODS))}, "
            f"got {context_parallel_method!r}"
        )
    return SigmoidAttention.Config(
        bias=bias, window_size=tuple(window_size), context_parallel_method=context_parallel_method
    )
