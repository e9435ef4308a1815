"""torchtitan checkpoints -> ``sigattn.models.GPT`` or a Hugging Face model with ``attn_implementation="sigmoid"``.

    weights = load_checkpoint("outputs/checkpoint/step-20")          # torchtitan's DCP folder
    gpt = to_gpt(weights, model_config)                              # sigattn's GPT, same function
    hf = to_transformers(weights, model_config)                      # LlamaForCausalLM / Qwen3ForCausalLM

``model_config`` is the torchtitan model config the checkpoint was trained with (``model_registry(flavour)
.model``, after ``resolve_sigmoid_bias`` if its bias was left to the trainer). The mapping:

    torchtitan                          GPT                         transformers
    tok_embeddings                      wte                         model.embed_tokens
    layers.i.attention_norm             blocks.i.norm1              model.layers.i.input_layernorm
    attention.qkv_linear.wq/wk/wv       attn.qkv (rows [q; k; v])   self_attn.q_proj / k_proj / v_proj
    attention.q_norm / k_norm           attn.q_norm / k_norm        self_attn.q_norm / k_norm (Qwen3)
    attention.wo                        attn.proj                   self_attn.o_proj
    layers.i.ffn_norm                   blocks.i.norm2              post_attention_layernorm
    feed_forward.w1, w3 / w2            mlp.fc (rows [w1; w3]) / mlp.proj   mlp.gate_proj, up_proj / down_proj
    norm, lm_head                       norm_f, lm_head             model.norm, lm_head

torchtitan's RoPE rotates adjacent pairs (x[2i], x[2i+1]); GPT's and transformers' rotate halves
(x[i], x[i + D/2]) with the same frequencies. Permuting each head's query and key rows (and the QK-norm
gains) by ``[0, 2, 4, ..., 1, 3, 5, ...]`` makes the two the same function (q.k is unchanged by a common
permutation of both). A model without QK-norm becomes a Llama, one with it a Qwen3 (QK-norm before RoPE,
like torchtitan's). Anything that would not compute the same function raises: RoPE scaling, a norm eps
other than the targets', a feed-forward width GPT cannot express, a bias that is not one constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ...models.gpt import GPT, GPTConfig
from .attention import SigmoidAttention

MODEL_PREFIXES = ("tok_embeddings.", "layers.", "norm.", "lm_head.")
NORM_EPS = 1e-5  # sigattn's make_norm and the converted Hugging Face configs


@dataclass(frozen=True)
class Architecture:
    """What the converters need to know about a torchtitan Llama 3 config."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    qk_norm: bool
    tie_embeddings: bool
    rope_theta: float
    bias: float


def architecture(model_config: Any) -> Architecture:
    """Reads and checks the architecture of a torchtitan ``Llama3Model.Config`` with sigmoid attention."""
    layers = getattr(model_config, "layers", None)
    if not layers:
        raise ValueError(
            f"model_config must be a torchtitan Llama 3 config with layers, got {type(model_config).__name__}"
        )
    attn = layers[0].attention
    inner = attn.inner_attention
    if not isinstance(inner, SigmoidAttention.Config):
        raise ValueError(
            f"model_config's inner attention must be SigmoidAttention.Config, got {type(inner).__name__}: "
            "only sigmoid-attention checkpoints convert"
        )
    if inner.bias is None:
        raise ValueError(
            "model_config's sigmoid bias is None: call resolve_sigmoid_bias(model_config, training_seq_len) first, "
            "with the seq_len the checkpoint was trained at"
        )
    if tuple(inner.window_size) != (-1, 0):
        raise ValueError(f"only causal attention converts; model_config has window_size={tuple(inner.window_size)}")
    rope = attn.rope
    if getattr(rope, "scaling", "none") != "none":
        raise ValueError(f"RoPE scaling {rope.scaling!r} has no counterpart in GPT; model_config needs scaling='none'")
    norms = [model_config.norm, layers[0].attention_norm, layers[0].ffn_norm]
    if attn.qk_norm is not None:
        norms.append(attn.qk_norm)
    for norm in norms:
        if norm.eps != NORM_EPS:
            raise ValueError(f"RMSNorm eps must be {NORM_EPS} to convert, got {norm.eps}")
    n_kv = attn.n_kv_heads or attn.n_heads
    head_dim = attn.head_dim or model_config.dim // attn.n_heads
    if head_dim * attn.n_heads != model_config.dim:
        raise ValueError(f"GPT needs head_dim * n_heads == dim; got {head_dim} * {attn.n_heads} != {model_config.dim}")
    return Architecture(
        dim=model_config.dim,
        n_layers=len(layers),
        n_heads=attn.n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        hidden_dim=layers[0].feed_forward.w1.out_features,
        vocab_size=model_config.vocab_size,
        qk_norm=attn.qk_norm is not None,
        tie_embeddings=bool(model_config.enable_weight_tying),
        rope_theta=float(rope.theta),
        bias=float(inner.bias),
    )


def load_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The model weights of a torchtitan checkpoint folder (``<dump>/checkpoint/step-N``: full or model-only,
    in torch.distributed.checkpoint format), read on the CPU without a process group."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(
            f"path must be a torchtitan checkpoint folder holding a .metadata file (e.g. outputs/checkpoint/step-10); "
            f"{str(path)!r} has none"
        )
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    state: dict[str, Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith(MODEL_PREFIXES) and isinstance(item, TensorStorageMetadata):
            state[key] = torch.empty(item.size, dtype=item.properties.dtype)
    if not state:
        raise ValueError(f"{str(path)!r} holds no model weights (no key starts with {', '.join(MODEL_PREFIXES)})")
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state


def rope_permutation(head_dim: int) -> Tensor:
    """The row order that turns adjacent-pair RoPE (torchtitan) into half-split RoPE (GPT, transformers)."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def _permute_heads(weight: Tensor, heads: int, head_dim: int) -> Tensor:
    perm = rope_permutation(head_dim)
    return weight.view(heads, head_dim, *weight.shape[1:])[:, perm].reshape(weight.shape)


def _take(state: dict[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise KeyError(f"the checkpoint has no {key!r}: is it a torchtitan Llama 3 checkpoint of this model_config?")
    return state[key]


def _rope_ready(state: dict[str, Tensor], arch: Architecture, i: int) -> dict[str, Tensor]:
    """Layer i's attention weights with query/key rows (and QK-norm gains) in half-split RoPE order."""
    p = f"layers.{i}.attention."
    out = {
        "wq": _permute_heads(_take(state, p + "qkv_linear.wq.weight"), arch.n_heads, arch.head_dim),
        "wk": _permute_heads(_take(state, p + "qkv_linear.wk.weight"), arch.n_kv_heads, arch.head_dim),
        "wv": _take(state, p + "qkv_linear.wv.weight"),
        "wo": _take(state, p + "wo.weight"),
    }
    if arch.qk_norm:
        perm = rope_permutation(arch.head_dim)
        out["q_norm"] = _take(state, p + "q_norm.weight")[perm]
        out["k_norm"] = _take(state, p + "k_norm.weight")[perm]
    return out


def gpt_config(arch: Architecture, block_size: int) -> GPTConfig:
    """The ``GPTConfig`` that computes the same function as the torchtitan model."""
    mlp_ratio = 1.5 * arch.hidden_dim / arch.dim
    config = GPTConfig(
        d_model=arch.dim,
        n_head=arch.n_heads,
        n_kv_head=arch.n_kv_heads,
        attn="sigmoid",
        qk_norm="rmsnorm" if arch.qk_norm else "none",
        norm="rmsnorm",
        norm_style="pre",
        mlp="swiglu",
        mlp_ratio=mlp_ratio,
        pos="rope",
        rope_base=arch.rope_theta,
        attn_bias="fixed",
        bias_init=arch.bias,
        vocab_size=arch.vocab_size,
        block_size=block_size,
        n_layer=arch.n_layers,
        tie_embeddings=arch.tie_embeddings,
    )
    hidden = -(-int(2 * int(mlp_ratio * arch.dim) / 3) // 8) * 8  # GPT's SwiGLU width (sigattn/nn/block.py)
    if hidden != arch.hidden_dim:
        raise ValueError(f"GPT's SwiGLU cannot have width {arch.hidden_dim} at d_model {arch.dim} (nearest: {hidden})")
    return config


def to_gpt(state: dict[str, Tensor], model_config: Any, *, block_size: int | None = None) -> GPT:
    """A ``sigattn.models.GPT`` holding the torchtitan weights ``state`` (``load_checkpoint``).

    ``block_size`` (GPT's training context, for generation windows) defaults to the context the bias was
    resolved from, ``round(exp(-bias))``; the bias itself is taken from ``model_config`` either way.
    """
    arch = architecture(model_config)
    if block_size is None:
        block_size = max(1, round(math.exp(-arch.bias)))
    model = GPT(gpt_config(arch, block_size))
    weights = {
        "wte.weight": _take(state, "tok_embeddings.weight"),
        "norm_f.weight": _take(state, "norm.weight"),
        "lm_head.weight": _take(state, "lm_head.weight"),
    }
    for i in range(arch.n_layers):
        attn = _rope_ready(state, arch, i)
        b, p = f"blocks.{i}.", f"layers.{i}."
        weights[b + "norm1.weight"] = _take(state, p + "attention_norm.weight")
        weights[b + "norm2.weight"] = _take(state, p + "ffn_norm.weight")
        weights[b + "attn.qkv.weight"] = torch.cat((attn["wq"], attn["wk"], attn["wv"]))
        weights[b + "attn.proj.weight"] = attn["wo"]
        if arch.qk_norm:
            weights[b + "attn.q_norm.weight"], weights[b + "attn.k_norm.weight"] = attn["q_norm"], attn["k_norm"]
        w1, w3 = _take(state, p + "feed_forward.w1.weight"), _take(state, p + "feed_forward.w3.weight")
        weights[b + "mlp.fc.weight"] = torch.cat((w1, w3))
        weights[b + "mlp.proj.weight"] = _take(state, p + "feed_forward.w2.weight")
    weights = {k: v.to(torch.float32) for k, v in weights.items()}
    model.load_state_dict(weights, strict=True)
    return model


def to_transformers(state: dict[str, Tensor], model_config: Any, *, max_position_embeddings: int | None = None):
    """A transformers ``LlamaForCausalLM`` (``Qwen3ForCausalLM`` with QK-norm) holding the torchtitan weights,
    with ``attn_implementation="sigmoid"`` (registered here) and ``config.sigmoid_attn_bias`` set, so it
    saves and loads as a sigmoid model (``sigattn.integrations.transformers``)."""
    import transformers

    from .. import transformers as sigmoid_hf

    sigmoid_hf.register()
    arch = architecture(model_config)
    if max_position_embeddings is None:
        max_position_embeddings = max(1, round(math.exp(-arch.bias)))
    kind = "Qwen3" if arch.qk_norm else "Llama"
    hf_config = getattr(transformers, f"{kind}Config")(
        vocab_size=arch.vocab_size,
        hidden_size=arch.dim,
        intermediate_size=arch.hidden_dim,
        num_hidden_layers=arch.n_layers,
        num_attention_heads=arch.n_heads,
        num_key_value_heads=arch.n_kv_heads,
        head_dim=arch.head_dim,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        tie_word_embeddings=arch.tie_embeddings,
        attention_bias=False,
        attention_dropout=0.0,
    )
    hf_config.sigmoid_attn_bias = arch.bias
    model = getattr(transformers, f"{kind}ForCausalLM")(hf_config)
    weights = {
        "model.embed_tokens.weight": _take(state, "tok_embeddings.weight"),
        "model.norm.weight": _take(state, "norm.weight"),
        "lm_head.weight": _take(state, "lm_head.weight"),
    }
    for i in range(arch.n_layers):
        attn = _rope_ready(state, arch, i)
        h, p = f"model.layers.{i}.", f"layers.{i}."
        weights[h + "input_layernorm.weight"] = _take(state, p + "attention_norm.weight")
        weights[h + "post_attention_layernorm.weight"] = _take(state, p + "ffn_norm.weight")
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            weights[h + f"self_attn.{theirs}.weight"] = attn[ours]
        if arch.qk_norm:
            weights[h + "self_attn.q_norm.weight"] = attn["q_norm"]
            weights[h + "self_attn.k_norm.weight"] = attn["k_norm"]
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            weights[h + f"mlp.{theirs}.weight"] = _take(state, p + f"feed_forward.{ours}.weight")
    model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    model.config.attn_implementation = "sigmoid"
    model.set_attn_implementation("sigmoid")
    return model.eval()
