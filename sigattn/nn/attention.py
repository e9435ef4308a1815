"""Multi-head self-attention that trains with sigmoid or softmax attention.

Sigmoid attention goes through the public ``sigattn.sigmoid_attn_func`` (so the FlashSigmoid kernels run
on CUDA and the blocked PyTorch path elsewhere); softmax through PyTorch's
``scaled_dot_product_attention``. Both share the projections, QK-norm and position encodings, so the
two differ only in the attention function:

    sigmoid: w_ij = sigmoid(scale * q_i . k_j + b_h - alibi_h(i, j))      (b_h fixed or learnable)
    softmax: w_ij = softmax_j(scale * q_i . k_j - alibi_h(i, j))

with w_ij = 0 for masked keys. The sigmoid bias is a constant, ``-log(n)`` of the training length n, or
a learnable per-head tensor initialised to it, never ``None``: evaluation at other context lengths must
use the bias the model was trained with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import sigmoid_attn_func
from .config import BlockConfig
from .norms import make_norm
from .position import RotaryEmbedding, alibi_bias, alibi_slopes


class SigmoidAttention(nn.Module):
    """Self-attention with GQA, optional QK-norm, RoPE or ALiBi, and a sigmoid or softmax attention.

    Args:
        config: the block settings (heads, ``attn``, ``qk_norm``, ``pos``, ``attn_bias``, ``bias_init``).
        seqlen: the training sequence length n; the sigmoid bias defaults to ``-log(n)``.
        causal: whether query i sees only keys j <= i.

    ``attn_out`` is an identity module applied to the attention output (B, S, Hq, D) before the output
    projection: a place for forward hooks (``sigattn.train.diagnostics`` measures its norm there).
    """

    def __init__(self, config: BlockConfig, seqlen: int, causal: bool):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.attn, self.causal = config.attn, causal
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=False)
        self.q_norm = make_norm(config.qk_norm, self.head_dim) if config.qk_norm != "none" else None
        self.k_norm = make_norm(config.qk_norm, self.head_dim) if config.qk_norm != "none" else None
        self.rope = RotaryEmbedding(self.head_dim, config.rope_base, seqlen) if config.pos == "rope" else None
        slopes = alibi_slopes(self.n_head) if config.pos == "alibi" else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        bias = -math.log(seqlen) if config.bias_init is None else float(config.bias_init)
        if config.attn_bias == "learnable":
            self.head_bias = nn.Parameter(torch.full((self.n_head,), bias))
        else:
            self.head_bias = None
            self.fixed_bias = bias
        self.attn_out = nn.Identity()
        self.attn_dropout = config.attn_dropout
        self.dropout = nn.Dropout(config.dropout)

    @property
    def bias(self) -> float | Tensor:
        """The sigmoid bias: the fixed float or the learnable (Hq,) tensor."""
        return self.fixed_bias if self.head_bias is None else self.head_bias

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, S, Hq, D), k and v (B, S, Hkv, D) of x (B, S, C): projected, QK-normed and rotated,
        all in v's dtype (the norms and RoPE compute in float32 under autocast)."""
        batch, seqlen, _ = x.shape
        sizes = [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        q, k, v = self.qkv(x).split(sizes, dim=-1)  # [B, S, Hq*D], [B, S, Hkv*D], [B, S, Hkv*D]
        q = q.view(batch, seqlen, self.n_head, self.head_dim)  # [B, S, Hq, D]
        k = k.view(batch, seqlen, self.n_kv_head, self.head_dim)  # [B, S, Hkv, D]
        v = v.view(batch, seqlen, self.n_kv_head, self.head_dim)  # [B, S, Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q, k)
        return q.to(v.dtype), k.to(v.dtype), v

    def forward(self, x: Tensor) -> Tensor:
        """x (B, S, C) -> (B, S, C)."""
        batch, seqlen, _ = x.shape
        q, k, v = self.project(x)
        if self.attn == "sigmoid":
            slopes = self.alibi_slopes  # float32 whatever the module's dtype (_apply)
            dropout_p = self.attn_dropout if self.training else 0.0
            out = sigmoid_attn_func(
                q, k, v, dropout_p=dropout_p, bias=self.bias, scale=self.scale, causal=self.causal, alibi_slopes=slopes
            )  # [B, S, Hq, D]
        else:
            out = self._softmax(q, k, v)  # [B, S, Hq, D]
        out = self.attn_out(out)
        return self.dropout(self.proj(out.reshape(batch, seqlen, self.n_head * self.head_dim)))

    def _apply(self, fn, recurse=True):
        # As RotaryEmbedding's tables: ``module.to(torch.bfloat16)`` would round the slopes (2^(-8h/n) is exact
        # in bf16 only where n is a power of two), so a cast is undone by recomputing them in float32.
        super()._apply(fn, recurse)
        if self.alibi_slopes is not None and self.alibi_slopes.dtype != torch.float32:
            self.alibi_slopes = alibi_slopes(self.n_head).to(self.alibi_slopes.device)
        return self

    def _softmax(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        group = self.n_head // self.n_kv_head
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [B, Hq, S, D]
        seqlen = q.shape[2]
        dropout_p = self.attn_dropout if self.training else 0.0
        if self.alibi_slopes is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.causal, scale=self.scale)
        else:
            mask = alibi_bias(self.alibi_slopes, seqlen, seqlen)  # [Hq, S, S]
            if self.causal:
                mask = mask.masked_fill(~self._causal_mask(seqlen, q.device), float("-inf"))
            mask = mask.to(q.dtype)[None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=self.scale)
        return out.transpose(1, 2)  # [B, S, Hq, D]

    @staticmethod
    def _causal_mask(seqlen: int, device) -> Tensor:
        return torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()  # [S, S], True = allowed

    @torch.no_grad()
    def attention_weights(self, x: Tensor) -> Tensor:
        """The attention weights w_ij of x (B, S, C) as (B, Hq, S, S) float32, masked entries 0.

        Materialises the scores: for diagnostics and tests on small inputs."""
        q, k, _ = self.project(x)
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=2)  # [B, S, Hq, D]
        logits = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * self.scale  # [B, Hq, S, S]
        seqlen = q.shape[1]
        if self.alibi_slopes is not None:
            logits = logits + alibi_bias(self.alibi_slopes, seqlen, seqlen)
        allowed = self._causal_mask(seqlen, x.device) if self.causal else torch.ones_like(logits, dtype=torch.bool)
        if self.attn == "softmax":
            return logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        bias = self.bias if isinstance(self.bias, float) else self.bias.float()[:, None, None]
        return torch.sigmoid(logits + bias) * allowed
