"""Layers for sigmoid-attention transformers: the attention module, the block, norms and positions.

``SigmoidAttention`` runs sigmoid attention through ``sigattn.sigmoid_attn_func`` or, with
``attn="softmax"``, softmax attention through PyTorch's SDPA, so one model trains either way.
"""

from .attention import SigmoidAttention
from .block import MLP, LayerScale, TransformerBlock
from .config import BlockConfig
from .norms import make_norm
from .position import RotaryEmbedding, alibi_bias, alibi_slopes, apply_rope, rope_angles, sinusoidal_positions

__all__ = [
    "MLP",
    "BlockConfig",
    "LayerScale",
    "RotaryEmbedding",
    "SigmoidAttention",
    "TransformerBlock",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "make_norm",
    "rope_angles",
    "sinusoidal_positions",
]
