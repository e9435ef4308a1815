"""Sigmoid attention as a Hugging Face transformers (5.x) attention implementation.

    from sigattn.integrations import transformers as sigmoid_hf

    sigmoid_hf.register()   # "sigmoid" in AttentionInterface and AttentionMaskInterface
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sigmoid")

Every layer computes ``sigmoid(scaling * q k^T + b) v`` with ``b`` a constant of the model (``config_bias``):
``config.sigmoid_attn_bias`` when set (a float, or per-layer / per-head lists as ``sigattn convert``
writes), else ``-log(max_position_embeddings)``; training, evaluation and generation at any length use the
same constant.

Masks. transformers builds a mask per forward through the mask function registered under the same name;
``sigmoid_attention_mask`` returns one of three things, and ``sigmoid_attention_forward`` maps each onto
sigattn's functions:

* ``None``: no padding, and the pattern is the module's plain causal (or bidirectional) one with query i at
  key position ``i + Sk - Sq`` (bottom-right, flash-attn's alignment: right for prefill, decode against a
  dynamic cache, and training). -> ``sigmoid_attn_func(causal=module.is_causal)``.
* a 2D boolean key mask (batch, Sk): the same pattern plus padding (left padding in batched generation,
  right padding in training). Sigmoid attention has no normaliser, so a masked key is exactly a key whose
  value row is zero: ``out_i = sum_j sigmoid(z_ij) [m_j] v_j``. The forward zeroes those rows of v and
  runs the dense function; outputs and gradients equal the masked attention's (the gradients of masked
  keys and values are zero: ``dz_ij = dO_i . (m_j v_j) sigma'(z_ij)``).
* a 4D boolean mask (batch, 1, Sq, Sk) otherwise (sliding windows that bind, packed position ids, static
  caches whose query offset is a tensor, or ``allow_is_causal_skip=False``). One query row broadcast
  over queries, ``(batch, 1, 1, Sk)`` as in decode against a static cache, is again a key mask; any
  other goes to ``scaled_dot_product_sigmoid_attention(attn_mask=...)``.

So the causal mask is never dropped: it is either implied by a bottom-right alignment that holds, or
materialised. GQA: key and value arrive as (batch, Hkv, Sk, D) and are passed unexpanded. Packed batches
(``cu_seq_lens_q`` and friends in the kwargs, as transformers' flattening collator gives them) go to
``sigmoid_attn_varlen_func``; each sequence is attended on its own.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..functional import (
    scaled_dot_product_sigmoid_attention,
    sigmoid_attn_func,
    sigmoid_attn_varlen_func,
)
from ..validation import values_checkable

ATTN_IMPLEMENTATION = "sigmoid"
BIAS_FIELD = "sigmoid_attn_bias"


def register(name: str = ATTN_IMPLEMENTATION) -> None:
    """Register ``sigmoid_attention_forward`` and ``sigmoid_attention_mask`` under ``name`` in transformers'
    global attention and attention-mask interfaces. Calling it again is harmless."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, sigmoid_attention_forward)
    AttentionMaskInterface.register(name, sigmoid_attention_mask)


# ---------------------------------------------------------------------------------------------- bias


def config_bias(config) -> float | list:
    """The model's logit bias, as configured.

    ``config.sigmoid_attn_bias`` when set: a float for every layer and head, or a list with one entry per
    layer (indexed by the attention module's ``layer_idx``), each a float or a list of per-head floats
    (``sigattn convert`` writes the latter). When unset, ``-log(max_position_embeddings)`` (the longest
    context the model is built for; sigattn/ops/sigmoid_attn/README.md says why ``-log n``), or for vision
    configurations with ``image_size`` and ``patch_size``, ``-log`` of the number of patches plus one (the
    class token). Raises ValueError naming the field to set when none of these exists or the value is
    malformed."""
    value = getattr(config, BIAS_FIELD, None)
    if value is not None:
        return _checked_bias(value)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None and getattr(config, "image_size", None) is not None:
        positions = _num_patches(config.image_size, config.patch_size) + 1
    if not isinstance(positions, int) or positions < 1:
        raise ValueError(
            f"cannot choose the sigmoid attention bias of a {type(config).__name__}: set config.{BIAS_FIELD} "
            f"(a float; -log of the training context is the usual choice), or max_position_embeddings "
            f"(got {positions!r})"
        )
    return -math.log(positions)


def _is_float(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _checked_bias(value) -> float | list:
    expected = (
        f"config.{BIAS_FIELD} must be a finite float, or a list with one entry per layer: a float or a list "
        f"of per-head floats"
    )
    if _is_float(value):
        return float(value)
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{expected}, got {value!r}")
    for entry in value:
        per_head = isinstance(entry, list | tuple) and entry and all(_is_float(x) for x in entry)
        if not (_is_float(entry) or per_head):
            raise ValueError(f"{expected}, got the entry {entry!r}")
    return list(value)


def _num_patches(image_size, patch_size) -> int:
    def pair(x):
        return tuple(x) if isinstance(x, list | tuple) else (x, x)

    (height, width), (patch_h, patch_w) = pair(image_size), pair(patch_size)
    return (height // patch_h) * (width // patch_w)


def module_bias(module: torch.nn.Module, num_heads: int) -> float | tuple[float, ...]:
    """The bias of one attention module: a float, or a tuple of ``num_heads`` per-head floats."""
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(
            f"{type(module).__name__} has no `config` attribute: sigmoid attention reads its bias from "
            f"the model config (config.{BIAS_FIELD})"
        )
    bias = config_bias(config)
    if not isinstance(bias, list):
        return bias
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int) or not 0 <= layer < len(bias):
        raise ValueError(
            f"config.{BIAS_FIELD} holds one entry per layer ({len(bias)}), but {type(module).__name__} has "
            f"layer_idx {layer!r}: per-layer biases need modules that know their layer index; use one float"
        )
    entry = bias[layer]
    if _is_float(entry):
        return float(entry)
    if len(entry) != num_heads:
        raise ValueError(
            f"config.{BIAS_FIELD}[{layer}] has {len(entry)} per-head values, the layer has {num_heads} heads"
        )
    return tuple(float(x) for x in entry)


_bias_tensors: dict[tuple, Tensor] = {}


def _bias_argument(bias: float | tuple[float, ...], device: torch.device) -> float | Tensor:
    """A per-head bias as a float32 (heads,) tensor on ``device``, made once per values and device (a
    constant of the graph under torch.compile)."""
    if isinstance(bias, float):
        return bias
    if torch.compiler.is_compiling():
        return torch.tensor(bias, dtype=torch.float32, device=device)
    key = (bias, device)
    if key not in _bias_tensors:
        _bias_tensors[key] = torch.tensor(bias, dtype=torch.float32, device=device)
    return _bias_tensors[key]


# ---------------------------------------------------------------------------------------------- masks


def sigmoid_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    **kwargs,
) -> Tensor | None:
    """transformers' mask-interface function for ``"sigmoid"``: None, a (batch, kv_length) boolean key mask,
    or a (batch, 1, q_length, kv_length) boolean mask; see the module docstring.

    transformers allows a skip (``allow_is_causal_skip`` / ``allow_is_bidirectional_skip``) only when the
    pattern is the plain causal / bidirectional one; the causal shortcut also needs query i at key
    ``i + kv_length - q_length``, i.e. ``q_offset - kv_offset == kv_length - q_length`` known at trace time.
    A sliding window or chunk (``local_size``) binds once ``kv_length >= local_size``; then the mask is
    materialised."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    local_applies = local_size is not None and kv_length >= local_size
    plain_causal = allow_is_causal_skip and _bottom_right(q_length, kv_length, q_offset, kv_offset)
    plain_bidirectional = allow_is_bidirectional_skip and isinstance(kv_offset, int | torch.SymInt)
    if not local_applies and (plain_causal or plain_bidirectional):
        return _key_mask(attention_mask, kv_length, kv_offset)
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        **kwargs,
    )


def _bottom_right(q_length, kv_length, q_offset, kv_offset) -> bool:
    """Whether query i sits at key position i + kv_length - q_length. A tensor offset (a static cache's
    position, read on the device) is not known when tracing: no."""
    ints = (int, torch.SymInt)
    if not (isinstance(q_offset, ints) and isinstance(kv_offset, ints)):
        return False
    return q_offset - kv_offset == kv_length - q_length


def _key_mask(attention_mask: Tensor | None, kv_length: int, kv_offset: int) -> Tensor | None:
    """The 2D padding mask over the kv_length keys (True = attend); None when there is none or it is all
    True (only checked where values may be read: not while compiling)."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    missing = kv_offset + kv_length - mask.shape[-1]
    if missing > 0:  # keys past the 2D mask (a static cache's empty slots) are not attended
        mask = torch.nn.functional.pad(mask, (0, missing), value=False)
    mask = mask[:, kv_offset : kv_offset + kv_length]
    if values_checkable() and bool(mask.all()):
        return None
    return mask


# -------------------------------------------------------------------------------------------- forward


def sigmoid_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-interface function for ``"sigmoid"``.

    Args:
        module: the attention module; its ``config`` gives the bias (``config_bias``), its ``is_causal``
            (default True) the causal flag unless ``is_causal`` is passed.
        query: (batch, heads, Sq, D). key, value: (batch, kv_heads, Sk, D), unexpanded for GQA.
        attention_mask: None, a (batch, Sk) boolean key mask, or a 4D mask (batch or 1, heads or 1, Sq, Sk),
            boolean or additive float, as ``sigmoid_attention_mask`` or a caller made it.
        dropout: attention dropout in [0, 1) (transformers passes the module's in training, 0 in evaluation).
        scaling: the logit scale, default 1/sqrt(D).
        kwargs: ``cu_seq_lens_q``/``cu_seq_lens_k``/``max_length_q``/``max_length_k`` select the packed
            (varlen) path; ``sliding_window`` applies a causal window when no 4D mask is given.

    Returns:
        (output (batch, Sq, heads, D), None): transformers' layout; attention weights are never returned.
    """
    _check_supported(kwargs)
    bias = _bias_argument(module_bias(module, query.shape[1]), query.device)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if kwargs.get("cu_seq_lens_q") is not None:
        return _packed_attention(query, key, value, bias, scaling, causal, dropout, kwargs), None

    key_mask = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            key_mask = attention_mask
        elif _is_key_mask(attention_mask):
            key_mask, causal = attention_mask[:, 0, 0], False  # the mask holds the whole pattern
        else:
            out = scaled_dot_product_sigmoid_attention(
                query,
                key,
                value,
                attn_mask=attention_mask,
                dropout_p=dropout,
                scale=scaling,
                bias=bias,
                enable_gqa=True,
            )
            return out.transpose(1, 2), None

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, S, H, D]
    if key_mask is not None:
        _check_key_mask(key_mask, k)
        v = v.masked_fill(~key_mask[:, :, None, None], 0)  # masked key == key with a zero value row
    window = _causal_window(kwargs.get("sliding_window")) if causal else (-1, -1)
    out = sigmoid_attn_func(q, k, v, dropout_p=dropout, bias=bias, scale=scaling, causal=causal, window_size=window)
    return out, None


def _check_supported(kwargs) -> None:
    for name, what in (
        ("softcap", "logit soft-capping"),
        ("position_bias", "an additive position bias"),
        ("s_aux", "attention sinks"),
        ("cache", "a paged cache (continuous batching)"),
    ):
        if kwargs.get(name) is not None:
            raise ValueError(f"sigmoid attention does not support {what} (`{name}` was passed)")


def _is_key_mask(mask: Tensor) -> bool:
    """A boolean 4D mask with one row shared by all heads and queries: (batch, 1, 1, Sk)."""
    return mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1


def _check_key_mask(mask: Tensor, k: Tensor) -> None:
    if mask.dtype != torch.bool or mask.shape[-1] != k.shape[1] or mask.shape[0] not in (1, k.shape[0]):
        raise ValueError(
            f"a 2D attention_mask must be a boolean key mask of shape (batch, kv_length) = "
            f"({k.shape[0]}, {k.shape[1]}), got a {mask.dtype} tensor of shape {tuple(mask.shape)}"
        )


def _causal_window(sliding_window) -> tuple[int, int]:
    """transformers' sliding window w lets query i see keys i - w + 1 .. i."""
    if sliding_window is None:
        return (-1, -1)
    return (int(sliding_window) - 1, 0)


def _packed_attention(query, key, value, bias, scaling, causal, dropout, kwargs) -> Tensor:
    """Packed sequences in one batch row: (1, H, total, D) -> varlen (total, H, D) -> (1, total, H, D)."""
    if query.shape[0] != 1:
        raise ValueError(
            f"packed sequences (cu_seq_lens_q given) must come as one batch row, got batch size {query.shape[0]}"
        )
    cu_q = kwargs["cu_seq_lens_q"]
    cu_k = kwargs.get("cu_seq_lens_k")
    cu_k = cu_q if cu_k is None else cu_k
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if max_q is None or max_k is None:
        raise ValueError("packed sequences need max_length_q and max_length_k with cu_seq_lens_q / cu_seq_lens_k")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [total, H, D]
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    out = sigmoid_attn_varlen_func(
        q, k, v, cu_q, cu_k, int(max_q), int(max_k), dropout_p=dropout, bias=bias, scale=scaling, causal=causal
    )
    return out[None]


__all__ = [
    "ATTN_IMPLEMENTATION",
    "BIAS_FIELD",
    "config_bias",
    "module_bias",
    "register",
    "sigmoid_attention_forward",
    "sigmoid_attention_mask",
]
