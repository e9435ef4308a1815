"""The diagnostics the sigmoid-attention recipe watches.

* Attention-output norm per layer: the mean L2 norm, over tokens, of a layer's attention output before
  its output projection (all heads together). Sigmoid weights need not sum to 1, so without the
  ``-log n`` bias this norm grows with the sequence length; a growing norm precedes instability.
* Gradient-norm spikes: steps whose global gradient norm exceeds ``factor`` times its running average.
* Attention sparsity per layer: the share of allowed (query, key) weights below 1% of their row's
  largest weight. Relative to the row maximum, so it compares sigmoid and softmax on an equal footing.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..nn import SigmoidAttention

SPARSITY_THRESHOLD = 0.01


class SpikeDetector:
    """Counts gradient-norm spikes: norms above ``factor`` x the exponential moving average (``beta``)
    of the norms before them, once ``warmup`` norms have been seen. Spikes do not enter the average."""

    def __init__(self, factor: float, beta: float = 0.95, warmup: int = 20):
        self.factor, self.beta, self.warmup = factor, beta, warmup
        self.average, self.seen, self.spikes = 0.0, 0, 0

    def update(self, norm: float) -> bool:
        """Feeds one step's gradient norm; True if it is a spike."""
        spike = self.seen >= self.warmup and norm > self.factor * self.average
        if spike:
            self.spikes += 1
        else:
            debiased_weight = 1.0 / (self.seen + 1) if self.seen < self.warmup else 1.0 - self.beta
            self.average += debiased_weight * (norm - self.average)
        self.seen += 1
        return spike

    def state_dict(self) -> dict:
        return {"average": self.average, "seen": self.seen, "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.average, self.seen, self.spikes = state["average"], state["seen"], state["spikes"]


def attention_modules(model: nn.Module) -> list[SigmoidAttention]:
    return [m for m in model.modules() if isinstance(m, SigmoidAttention)]


def row_sparsity(weights: Tensor, causal: bool, threshold: float = SPARSITY_THRESHOLD) -> float:
    """The share of allowed entries of weights (B, H, Sq, Sk) below ``threshold`` x their row maximum."""
    allowed = torch.ones(weights.shape[-2:], dtype=torch.bool, device=weights.device)
    if causal:
        allowed = allowed.tril()
    small = weights < threshold * weights.amax(dim=-1, keepdim=True)
    return ((small & allowed).sum() / (allowed.sum() * weights[..., 0, 0].numel())).item()


@torch.no_grad()
def attention_stats(model: nn.Module, inputs: Tensor, autocast=contextlib.nullcontext) -> dict[str, list[float]]:
    """Runs ``model(inputs)`` once in eval mode and returns, per attention layer, ``attn_out_norm`` and
    ``attn_sparsity`` (see the module docstring)."""
    layers = attention_modules(model)
    norms: dict[int, float] = {}
    sparsity: dict[int, float] = {}
    hooks = []
    for i, layer in enumerate(layers):

        def on_output(module, args, out, i=i):  # out: [B, S, Hq, D]
            norms[i] = out.float().flatten(2).norm(dim=-1).mean().item()

        def on_input(module, args, i=i):  # args[0]: the layer's input [B, S, C]
            sparsity[i] = row_sparsity(module.attention_weights(args[0]), module.causal)

        hooks.append(layer.attn_out.register_forward_hook(on_output))
        hooks.append(layer.register_forward_pre_hook(on_input))
    was_training = model.training
    model.eval()
    try:
        with autocast():
            model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return {
        "attn_out_norm": [norms[i] for i in range(len(layers))],
        "attn_sparsity": [sparsity[i] for i in range(len(layers))],
    }
