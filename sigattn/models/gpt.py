"""A decoder-only language model (GPT) whose attention is sigmoid or softmax (``config.attn``).

    idx (B, S) -> token embeddings (+ sinusoidal positions) -> n_layer TransformerBlocks (causal)
               -> final norm -> logits (B, S, vocab_size)

RoPE and ALiBi act inside the attention; with them (or sinusoidal or no positions) the model runs at any
sequence length, so it can be evaluated at contexts other than ``block_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..nn import BlockConfig, TransformerBlock, make_norm, sinusoidal_positions
from ..nn.config import check_positive

INIT_STD = 0.02


@dataclass
class GPTConfig(BlockConfig):
    """A GPT: the block settings (``BlockConfig``) plus the vocabulary, context and depth."""

    vocab_size: int = 256
    block_size: int = 256  # the training context; the sigmoid bias defaults to -log(block_size)
    n_layer: int = 4
    tie_embeddings: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "vocab_size", "block_size", "n_layer")


def init_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2's initialisation: N(0, 0.02) for linear and embedding weights, N(0, 0.02 / sqrt(2 n_layer))
    for the projections that write into the residual stream (attention output and MLP output)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            std = INIT_STD / math.sqrt(2 * n_layer) if name.endswith(".proj") else INIT_STD
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class GPT(nn.Module):
    """The language model. ``activation_checkpointing = True`` recomputes each block in the backward."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(config, config.block_size, causal=True) for _ in range(config.n_layer)
        )
        self.norm_f = make_norm(config.norm, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self, config.n_layer)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, S) int64 token ids -> logits (B, S, vocab_size) and, given targets (B, S), the mean
        cross-entropy (computed in float32)."""
        batch, seqlen = idx.shape
        x = self.wte(idx)  # [B, S, C]
        if self.config.pos == "sinusoidal":
            # At the token embeddings' scale, so neither dominates at initialisation.
            x = x + INIT_STD * sinusoidal_positions(seqlen, self.config.d_model, device=idx.device).to(x.dtype)
        x = self.drop(x)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)  # [B, S, C]
        logits = self.lm_head(self.norm_f(x))  # [B, S, V]
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(batch * seqlen))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: Tensor, num_tokens: int, temperature: float = 1.0, generator=None) -> Tensor:
        """Samples ``num_tokens`` tokens after idx (B, S0), each from the last ``block_size`` tokens;
        returns (B, S0 + num_tokens)."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(
                f"temperature must be a finite number > 0 (1: the model's distribution), got {temperature!r}"
            )
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must be (batch, S0) token ids with S0 >= 1, got shape {tuple(idx.shape)}")
        for _ in range(num_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])
            probs = (logits[:, -1].float() / temperature).softmax(dim=-1)  # [B, V]
            idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)
        return idx
