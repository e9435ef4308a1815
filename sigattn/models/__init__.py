"""Models built from ``sigattn.nn`` blocks: a GPT language model and a ViT classifier."""

from .gpt import GPT, GPTConfig
from .vit import ViT, ViTConfig

__all__ = ["GPT", "GPTConfig", "ViT", "ViTConfig"]
