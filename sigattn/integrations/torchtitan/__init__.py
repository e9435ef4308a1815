"""Sigmoid attention in torchtitan (0.3), the PyTorch-native trainer: FSDP2, TP, PP, CP, compile, float8.

* ``SigmoidAttention`` (``attention.py``): the inner attention of torchtitan's ``GQAttention``: dense causal
  ``sigmoid_attn_func`` (GQA unexpanded), ``sigmoid_attn_varlen_func`` for document-packed rows, and ring or
  Ulysses attention over torchtitan's ``cp`` mesh with ``context_parallel_degree > 1``.
* ``SigmoidLlama3Model``, ``FLAVOURS`` and ``model_registry`` (``model.py``): Llama 3 flavours (debug, debug
  with GQA and QK-norm, ~100M) with sigmoid attention; the bias is ``-log(training.seq_len)`` unless set.
* ``config_registry.py``: the jobs for torchtitan's launcher (``--module sigattn.integrations.torchtitan
  --config sigmoid_llama3_debugmodel``), each with a softmax twin.
* ``LocalTextDataLoader`` and ``write_tokenizer_assets`` (``data.py``): a local text file and a locally trained
  tokenizer; nothing is downloaded.
* ``load_checkpoint``, ``to_gpt``, ``to_transformers`` (``convert.py``): torchtitan checkpoints into
  ``sigattn.models.GPT`` or a transformers Llama/Qwen3 with ``attn_implementation="sigmoid"``.

Needs ``pip install 'sigattn[torchtitan]'`` (see ``sigattn/integrations/README.md`` for why transformers 5
and torchtitan 0.3's pinned ``datasets`` do not share an environment, and the way around it).
"""

from __future__ import annotations

try:
    import torchtitan  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without torchtitan
    raise ImportError(
        "sigattn.integrations.torchtitan needs torchtitan 0.3: pip install 'sigattn[torchtitan]' "
        "(see sigattn/integrations/README.md)"
    ) from error

from .attention import SigmoidAttention, sigmoid_attention_config
from .convert import load_checkpoint, to_gpt, to_transformers
from .data import LocalTextDataLoader, write_tokenizer_assets
from .model import FLAVOURS, SigmoidLlama3Model, build_model_config, model_registry, resolve_sigmoid_bias

__all__ = [
    "FLAVOURS",
    "LocalTextDataLoader",
    "SigmoidAttention",
    "SigmoidLlama3Model",
    "build_model_config",
    "load_checkpoint",
    "model_registry",
    "resolve_sigmoid_bias",
    "sigmoid_attention_config",
    "to_gpt",
    "to_transformers",
    "write_tokenizer_assets",
]
