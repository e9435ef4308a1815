"""Llama 3 with sigmoid attention, as a torchtitan model: flavours, the model class and its ``ModelSpec``.

``SigmoidLlama3Model`` is torchtitan's ``Llama3Model`` (same blocks, same parameter names, same
checkpoints) whose layers' inner attention is ``SigmoidAttention``. Its config does three things when the
trainer hands it the job config (``update_from_config``):

* resolves the sigmoid bias once: ``-log(training.seq_len)`` for every layer whose ``bias`` is None;
* with ``parallelism.context_parallel_degree > 1``, keeps K/V sharded along the sequence at the inner
  attention's boundary (torchtitan's own sharding all-gathers them for softmax) and sets the shard layout
  from ``context_parallel_load_balancer`` (``headtail`` = zig-zag, None = contiguous); the attention binds
  the ``cp`` mesh's group in ``parallelize`` and runs ring (or Ulysses) attention over it;
* allows the varlen-style config with CP (stock Llama 3 refuses it, since its varlen kernel cannot shard).

``get_attention_masks`` answers None (dense causal, the fast path) when every row is one sequence
(positions ``0 .. L-1``) and torchtitan's ``VarlenMetadata`` when rows pack several documents; under CP a
packed row raises, since ring attention is causal over the whole sequence.

Flavours (``FLAVOURS``): ``debugmodel`` (torchtitan's Llama 3 debug model: dim 256, 6 layers, 16 heads,
vocab 2048), ``debugmodel_gqa_qk_norm`` (4 KV heads and QK-norm) and ``100M`` (dim 768, 12 layers, 12
heads, 4 KV heads, QK-norm, tied embeddings, vocab 32000: 100.1M parameters). RoPE is unscaled
(``scaling="none"``, theta 500000) so that ``sigattn.models.GPT`` computes the same function
(``convert.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import spmd_types as spmd
import torch
from torch import nn
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
from torchtitan.models.common.attention import create_varlen_metadata_for_document
from torchtitan.models.common.config_utils import get_attention_config, make_ffn_config, make_gqa_config
from torchtitan.models.common.decoder import Decoder
from torchtitan.models.common.decoder_sharding import dense_activation_placement
from torchtitan.models.common.param_init import depth_scaled_std
from torchtitan.models.llama3.model import Llama3Model, Llama3TransformerBlock
from torchtitan.models.llama3.parallelize import parallelize_llama
from torchtitan.models.llama3.sharding import set_llama3_sharding_config
from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.protocols.sharding import LocalMapConfig, ShardingConfig

from .attention import SigmoidAttention, check_bias, sigmoid_attention_config

MODEL_NAME = "sigmoid_llama3"
ROPE_THETA = 500000.0
# torchtitan's ``parallelism.context_parallel_load_balancer`` -> sigattn's ``load_balance``: "headtail"
# gives rank r chunks r and 2N-1-r, exactly sigattn's zig-zag (tests/test_torchtitan.py checks it).
CP_LAYOUTS: dict[str | None, bool] = {"headtail": True, None: False}


@dataclass(frozen=True)
class Flavour:
    """The sizes of one registered model."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None
    vocab_size: int
    ffn_multiple_of: int
    qk_norm: bool
    tie_embeddings: bool


FLAVOURS: dict[str, Flavour] = {
    # torchtitan's llama3 "debugmodel" sizes.
    "debugmodel": Flavour(256, 6, 16, None, 2048, 256, qk_norm=False, tie_embeddings=False),
    "debugmodel_gqa_qk_norm": Flavour(256, 6, 16, 4, 2048, 256, qk_norm=True, tie_embeddings=False),
    # The sigmoid-attention recipe at ~100M parameters: b = -log(n), QK-norm, GQA.
    "100M": Flavour(768, 12, 12, 4, 32000, 256, qk_norm=True, tie_embeddings=True),
}

ATTN_BACKENDS: tuple[str, ...] = ("sigmoid", "flex", "varlen")


def _linear_init() -> dict[str, Callable]:
    return {"weight": partial(nn.init.trunc_normal_, std=0.02), "bias": nn.init.zeros_}


def _depth_init(layer_id: int) -> dict[str, Callable]:
    std = depth_scaled_std(0.02, layer_id)
    return {"weight": partial(nn.init.trunc_normal_, std=std), "bias": nn.init.zeros_}


def _norm_config(dim: int) -> RMSNorm.Config:
    return RMSNorm.Config(normalized_shape=dim, param_init={"weight": nn.init.ones_})


def sigmoid_inner_attention_sharding() -> ShardingConfig:
    """The inner attention's sharding: q, k, v and the output all stay sequence-sharded on the ``cp`` axis
    (torchtitan's softmax sharding all-gathers k and v there); ring or Ulysses attention exchanges them."""
    qkv = dense_activation_placement(tp=spmd.S(2))
    return ShardingConfig(
        in_src_shardings={"q_BLNH": qkv, "k_BLNH": qkv, "v_BLNH": qkv},
        in_dst_shardings={"q_BLNH": qkv, "k_BLNH": qkv, "v_BLNH": qkv},
        out_src_shardings=qkv,
        local_map=LocalMapConfig(in_grad_placements=(qkv, qkv, qkv)),
    )


def sigmoid_attention_configs(model_config: Decoder.Config) -> list[SigmoidAttention.Config]:
    """The ``SigmoidAttention.Config`` of every layer of ``model_config`` (empty for a softmax model)."""
    return [cfg for _, cfg, _, _ in model_config.traverse(SigmoidAttention.Config)]


def resolve_sigmoid_bias(model_config: Decoder.Config, seq_len: int) -> None:
    """Sets ``bias = -log(seq_len)`` on every sigmoid inner attention of ``model_config`` whose bias is None."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len (the training context) must be a positive int, got {seq_len!r}")
    for cfg in sigmoid_attention_configs(model_config):
        if cfg.bias is None:
            cfg.bias = -math.log(seq_len)
        check_bias(cfg.bias)


def _single_sequence_rows(positions: torch.Tensor) -> bool:
    """Whether every row's positions are 0 .. L-1 (one sequence per row: plain causal attention)."""
    seqlen = positions.shape[-1]
    expected = torch.arange(seqlen, device=positions.device, dtype=positions.dtype)
    return bool((positions == expected).all())


class SigmoidLlama3Model(Llama3Model):
    """torchtitan's Llama 3 with sigmoid inner attention; see the module docstring."""

    @dataclass(kw_only=True, slots=True)
    class Config(Llama3Model.Config):
        def update_from_config(self, *, config: Any, **kwargs: Any) -> None:
            """Applies the job config: RoPE length (torchtitan's), sharding, the sigmoid bias and the CP layout."""
            sigmoid_configs = sigmoid_attention_configs(self)
            if not sigmoid_configs:
                Llama3Model.Config.update_from_config(self, config=config, **kwargs)
                return
            Decoder.Config.update_from_config(self, config=config, **kwargs)
            parallelism = config.parallelism
            set_llama3_sharding_config(self, enable_sp=parallelism.enable_sequence_parallel)
            for cfg in sigmoid_configs:
                cfg.sharding_config = sigmoid_inner_attention_sharding()
            training = getattr(config, "training", None)
            if training is not None:
                resolve_sigmoid_bias(self, training.seq_len)
            if parallelism.context_parallel_degree > 1:
                if parallelism.spmd_backend == "partial_dtensor":
                    raise ValueError(
                        "context parallel with sigmoid attention needs parallelism.spmd_backend 'spmd_types' or "
                        "'full_dtensor' (the attention binds the cp mesh in Module.parallelize); got "
                        "'partial_dtensor', whose CP wrapper knows only torchtitan's softmax attentions"
                    )
                balancer = parallelism.context_parallel_load_balancer
                if balancer not in CP_LAYOUTS:
                    raise ValueError(
                        "parallelism.context_parallel_load_balancer must be 'headtail' (zig-zag shards) or None "
                        f"(contiguous shards) with sigmoid attention, got {balancer!r}"
                    )
                for cfg in sigmoid_configs:
                    cfg.context_parallel_load_balance = CP_LAYOUTS[balancer]

    def get_attention_masks(self, positions: torch.Tensor) -> Any:
        """None for rows that are one sequence each (dense causal); torchtitan's ``VarlenMetadata`` for rows
        that pack documents (positions restart at 0 at each document)."""
        if not sigmoid_attention_configs(self.config):
            return super().get_attention_masks(positions)
        if _single_sequence_rows(positions):
            return None
        if self.context_parallel:
            raise ValueError(
                "a batch row packs several documents (its positions restart at 0), but context parallel ring "
                "attention is causal over the whole sequence: feed one sequence per row (positions 0 .. L-1, "
                "e.g. LocalTextDataLoader.Config(documents=False)) or turn context parallel off"
            )
        return create_varlen_metadata_for_document(positions)

    @property
    def context_parallel(self) -> bool:
        """Whether the attention runs over a context-parallel group."""
        return any(isinstance(m, SigmoidAttention) and m.context_parallel_group is not None for m in self.modules())


def build_model_config(flavour: str, attn_backend: str = "sigmoid", *, bias: float | None = None) -> Llama3Model.Config:
    """The model config of a registered flavour.

    Args:
        flavour: a key of ``FLAVOURS``.
        attn_backend: ``sigmoid`` (``SigmoidAttention``), or torchtitan's softmax ``flex`` / ``varlen`` for a
            baseline of the same architecture.
        bias: the sigmoid bias; None resolves to ``-log(training.seq_len)`` in ``update_from_config``.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {', '.join(map(repr, FLAVOURS))}, got {flavour!r}")
    if attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {', '.join(map(repr, ATTN_BACKENDS))}, got {attn_backend!r}")
    if attn_backend != "sigmoid" and bias is not None:
        raise ValueError(f"bias is a sigmoid attention setting; attn_backend={attn_backend!r} takes none")
    f = FLAVOURS[flavour]
    head_dim = f.dim // f.n_heads
    inner = sigmoid_attention_config(bias=bias) if attn_backend == "sigmoid" else get_attention_config(attn_backend)
    rope = ComplexRoPE.Config(dim=head_dim, max_seq_len=131072, theta=ROPE_THETA, scaling="none")
    layers = []
    for layer_id in range(f.n_layers):
        attention = make_gqa_config(
            dim=f.dim,
            n_heads=f.n_heads,
            n_kv_heads=f.n_kv_heads,
            wqkv_param_init=_linear_init(),
            wo_param_init=_depth_init(layer_id),
            inner_attention=dataclasses.replace(inner),
            fuse_qkv=True,
            rope=rope,
            qk_norm=_norm_config(head_dim) if f.qk_norm else None,
        )
        ffn = make_ffn_config(
            dim=f.dim,
            hidden_dim=compute_ffn_hidden_dim(f.dim, multiple_of=f.ffn_multiple_of),
            w1_param_init=_linear_init(),
            w2w3_param_init=_depth_init(layer_id),
        )
        layers.append(
            Llama3TransformerBlock.Config(
                attention_norm=_norm_config(f.dim), ffn_norm=_norm_config(f.dim), attention=attention, feed_forward=ffn
            )
        )
    std = f.dim**-0.5
    config_cls = SigmoidLlama3Model.Config if attn_backend == "sigmoid" else Llama3Model.Config
    return config_cls(
        dim=f.dim,
        vocab_size=f.vocab_size,
        enable_weight_tying=f.tie_embeddings,
        tok_embeddings=Embedding.Config(
            num_embeddings=f.vocab_size,
            embedding_dim=f.dim,
            param_init={"weight": partial(nn.init.normal_, std=1.0)},
        ),
        norm=_norm_config(f.dim),
        lm_head=Linear.Config(
            in_features=f.dim,
            out_features=f.vocab_size,
            param_init={"weight": partial(nn.init.trunc_normal_, std=std, a=-3 * std, b=3 * std)},
        ),
        layers=layers,
    )


def model_registry(flavour: str, attn_backend: str = "sigmoid", *, bias: float | None = None) -> ModelSpec:
    """torchtitan's ``ModelSpec`` of a flavour (its ``model_registry`` counterpart): torchtitan's Llama 3
    parallelisation, pipelining and Hugging Face state-dict adapter, which all apply unchanged."""
    return ModelSpec(
        name=MODEL_NAME if attn_backend == "sigmoid" else "llama3",
        flavor=flavour,
        model=build_model_config(flavour, attn_backend, bias=bias),
        parallelize_fn=parallelize_llama,
        pipelining_fn=pipeline_llm,
        post_optimizer_build_fn=None,
        state_dict_adapter=Llama3StateDictAdapter,
    )
