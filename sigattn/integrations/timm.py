"""A sigmoid-attention drop-in for timm's ``Attention`` (the ViT block's attention).

    import timm
    from sigattn.integrations.timm import SigmoidAttention

    model = timm.create_model("vit_base_patch16_224", attn_layer=SigmoidAttention)
    model.load_state_dict(softmax_vit.state_dict())          # same parameter names: qkv, proj, q_norm, ...
    model = timm.create_model(..., attn_layer=SigmoidAttention.with_bias(-5.3))   # a fixed bias

``SigmoidAttention`` takes timm's constructor arguments and keeps its submodule names (``qkv``, ``q_norm``,
``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``), so checkpoints of the stock layer load
unchanged; only the attention itself becomes ``sigmoid(scale * q k^T + b) v`` through
``scaled_dot_product_sigmoid_attention`` (timm's ``attn_mask`` and ``is_causal`` keep their SDPA meaning).
The bias is the class attribute ``logit_bias`` (set by ``with_bias``), or when None ``-log N`` of the input's
N tokens: a ViT sees one N (patches plus prefix tokens) in training and inference, a constant of the model.

This module does not import timm: it works, and is tested, without it (timm needs torchvision, which has no
CPU wheel on some platforms). timm passes ``attn_layer`` through ``issubclass``, hence a class per bias
rather than a ``functools.partial``.
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor, nn

from ..functional import scaled_dot_product_sigmoid_attention


class SigmoidAttention(nn.Module):
    """timm's multi-head self-attention (``timm.layers.Attention``) with sigmoid attention weights.

    Args: as timm's ``Attention``: ``dim``, ``num_heads``, ``attn_head_dim`` (default dim // num_heads),
    ``dim_out`` (default dim), ``qkv_bias``, ``qk_norm``, ``scale_norm`` (both need ``norm_layer``),
    ``proj_bias``, ``gated`` (a sigmoid output gate), ``attn_drop`` (attention dropout, applied in training as
    timm's fused path does: the kernels' ``dropout_p``), ``proj_drop``, ``norm_layer``, ``device``, ``dtype``.
    """

    logit_bias: float | None = None

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        for name, value in (("dim", dim), ("num_heads", num_heads), ("attn_head_dim", attn_head_dim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(
                    f"dim ({dim}) must be a multiple of num_heads ({num_heads}) unless attn_head_dim is set"
                )
            head_dim = dim // num_heads
        if not 0.0 <= attn_drop < 1.0:  # (nn.Dropout takes 1; the kernels' dropout_p does not)
            raise ValueError(f"attn_drop must be in [0, 1), got {attn_drop}")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer is required with qk_norm=True or scale_norm=True")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **factory)
        self.q_norm = norm_layer(head_dim, **factory) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **factory) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **factory) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **factory) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def with_bias(cls, bias: float) -> type[SigmoidAttention]:
        """A subclass whose attention uses the constant ``bias`` (pass it as timm's ``attn_layer``)."""
        if isinstance(bias, bool) or not isinstance(bias, numbers.Real) or not math.isfinite(bias):
            raise ValueError(f"bias must be a finite number, got {bias!r}")
        return type(f"{cls.__name__}Bias", (cls,), {"logit_bias": float(bias)})

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, D]
        q, k = self.q_norm(q), self.k_norm(k)
        x = scaled_dot_product_sigmoid_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scale,
            bias=self.logit_bias,
        )
        x = self.norm(x.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


__all__ = ["SigmoidAttention"]
