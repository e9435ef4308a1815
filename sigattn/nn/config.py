"""The settings of a transformer block, shared by the models (``GPTConfig`` and ``ViTConfig`` extend it).

Every field is checked when the config is built: a string option outside its choices or a size that does
not fit raises a ``ValueError`` naming the field, what it accepts and what it got.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass
from typing import Literal

AttnKind = Literal["sigmoid", "softmax"]
NormKind = Literal["layernorm", "rmsnorm"]
QKNormKind = Literal["none", "layernorm", "rmsnorm"]
NormStyle = Literal["pre", "post", "hybrid"]
PosKind = Literal["rope", "alibi", "sinusoidal", "none"]
BiasKind = Literal["fixed", "learnable"]
MLPKind = Literal["gelu", "swiglu"]


def literal_choices(annotation) -> tuple | None:
    """The allowed values of a ``Literal[...]`` annotation (also inside ``X | None``), else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        choices = literal_choices(arg)
        if choices is not None:
            return choices
    return None


def check_fields(config) -> None:
    """Checks every ``Literal`` field of a dataclass instance against its choices."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        choices = literal_choices(hints[f.name])
        value = getattr(config, f.name)
        if choices is not None and value not in choices and value is not None:
            raise ValueError(f"{f.name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_finite(config, *names: str, positive: bool = False, optional: bool = False) -> None:
    """Checks that each named field is a finite real number (> 0 with ``positive``; or None with ``optional``)."""
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not number or (positive and value <= 0):
            raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}")


@dataclass
class BlockConfig:
    """One transformer block: attention, MLP, norms and position encoding.

    ``attn`` picks sigmoid attention (``sigattn.sigmoid_attn_func``) or softmax attention (PyTorch's
    ``scaled_dot_product_attention``), so one model trains either way. The sigmoid bias is
    ``bias_init`` (default ``-log(n)``, n the model's training sequence length), fixed or, with
    ``attn_bias="learnable"``, one learnable value per head; softmax has no use for it (a constant added
    to every logit of a row cancels).
    """

    d_model: int = 128
    n_head: int = 4
    n_kv_head: int | None = None  # key/value heads (GQA); None: one per query head
    attn: AttnKind = "sigmoid"
    qk_norm: QKNormKind = "none"  # a norm over each head's queries and keys, before RoPE
    norm: NormKind = "layernorm"
    norm_style: NormStyle = "pre"  # hybrid: pre-norm plus a norm on the attention output
    layerscale: float | None = None  # initial LayerScale value; None: no LayerScale
    mlp: MLPKind = "gelu"
    mlp_ratio: float = 4.0
    pos: PosKind = "rope"
    rope_base: float = 10000.0
    attn_bias: BiasKind = "fixed"
    bias_init: float | None = None  # None: -log(training sequence length)
    dropout: float = 0.0
    attn_dropout: float = 0.0  # attention-weight dropout (sigmoid or softmax), applied in training only

    def __post_init__(self):
        check_fields(self)
        check_positive(self, "d_model", "n_head")
        if self.n_kv_head is not None:
            check_positive(self, "n_kv_head")
            if self.n_head % self.n_kv_head:
                raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head (got {self.n_kv_head})")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head (got {self.n_head})")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"pos='rope' needs an even head dim (d_model / n_head), got {self.head_dim}")
        check_finite(self, "dropout", "attn_dropout")
        check_finite(self, "bias_init", "layerscale", optional=True)  # None: -log n, no LayerScale
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        check_finite(self, "mlp_ratio", "rope_base", positive=True)
        if int(self.mlp_ratio * self.d_model) < 1:  # the MLP's hidden width
            raise ValueError(
                f"mlp_ratio * d_model must be at least 1 (the MLP's hidden width), got {self.mlp_ratio!r} * "
                f"{self.d_model}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head
