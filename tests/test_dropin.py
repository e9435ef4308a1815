"""Drop-in calls: the SDPA-style function takes SDPA's arguments in SDPA's order (``dropout_p`` fifth, in
[0, 1)), and the flash-style functions take flash-attn's name for the scale, ``softmax_scale``."""

from __future__ import annotations

import ast
import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F

import sigattn
from sigattn import (
    scaled_dot_product_sigmoid_attention,
    sigmoid_attn_func,
    sigmoid_attn_varlen_func,
    sigmoid_attn_with_kvcache,
)


def sdpa_inputs(heads_k: int = 4):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=gen, dtype=torch.float64)  # [B, H, Sq, D]
    k = torch.randn(2, heads_k, 7, 16, generator=gen, dtype=torch.float64)
    return q, k, torch.randn(2, heads_k, 7, 16, generator=gen, dtype=torch.float64)


def test_sdpa_parameters_are_sdpas_in_sdpas_order():
    """Every parameter of torch's SDPA, in its order and with its default, then ``bias``, keyword only. SDPA
    is a builtin without an inspectable signature: its docstring's first line states it."""
    documented = F.scaled_dot_product_attention.__doc__.split("->")[0]
    documented = re.fullmatch(r"\s*scaled_dot_product_attention\((.*)\)\s*", documented, re.S).group(1)
    torch_params = [part.strip().split("=") for part in documented.split(",")]
    ours = list(inspect.signature(scaled_dot_product_sigmoid_attention).parameters.values())
    assert [p.name for p in ours] == [name for name, *_ in torch_params] + ["bias"]
    for param, (_, *default) in zip(ours, torch_params, strict=False):
        assert param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        expected_default = ast.literal_eval(default[0]) if default else inspect.Parameter.empty
        assert param.default == expected_default, param.name
    assert ours[-1].kind is inspect.Parameter.KEYWORD_ONLY


def test_positional_call_in_sdpas_order():
    q, k, v = sdpa_inputs()
    expected = scaled_dot_product_sigmoid_attention(q, k, v, is_causal=True, scale=0.3)
    # SDPA's positional order: attn_mask, dropout_p, is_causal, scale, enable_gqa.
    torch.testing.assert_close(scaled_dot_product_sigmoid_attention(q, k, v, None, 0.0, True, 0.3, False), expected)
    q, k, v = sdpa_inputs(heads_k=2)
    grouped = scaled_dot_product_sigmoid_attention(q, k, v, None, 0.0, False, None, True)
    torch.testing.assert_close(grouped, scaled_dot_product_sigmoid_attention(q, k, v, enable_gqa=True))
    with pytest.raises(TypeError):  # bias is keyword only: a ninth positional argument is a mistake
        scaled_dot_product_sigmoid_attention(q, k, v, None, 0.0, False, None, True, -2.0)


@pytest.mark.parametrize("dropout_p", [0, 0.0], ids=["int", "float"])
def test_nanogpt_call_with_dropout_zero(dropout_p):
    """nanoGPT's call: ``F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=self.dropout if
    self.training else 0, is_causal=True)``, in eval mode."""
    q, k, v = sdpa_inputs()
    out = scaled_dot_product_sigmoid_attention(q, k, v, attn_mask=None, dropout_p=dropout_p, is_causal=True)
    torch.testing.assert_close(out, scaled_dot_product_sigmoid_attention(q, k, v, is_causal=True))


def test_positional_dropout_p_drops_weights():
    """SDPA's fifth positional argument is dropout_p: a training call's output differs from the evaluation
    one and is reproducible from the seed (tests/test_dropout.py checks which weights)."""
    q, k, v = sdpa_inputs()
    torch.manual_seed(3)
    out = scaled_dot_product_sigmoid_attention(q, k, v, None, 0.5, True)
    assert not torch.allclose(out, scaled_dot_product_sigmoid_attention(q, k, v, is_causal=True))
    torch.manual_seed(3)
    torch.testing.assert_close(scaled_dot_product_sigmoid_attention(q, k, v, None, 0.5, True), out, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("dropout_p", "error", "message"),
    [
        (-0.1, ValueError, r"dropout_p must be a float in \[0, 1\), got -0\.1"),
        (1.0, ValueError, r"dropout_p must be a float in \[0, 1\), got 1\.0"),
        (1.5, ValueError, r"dropout_p must be a float in \[0, 1\), got 1\.5"),
        (math.nan, ValueError, r"dropout_p must be a float in \[0, 1\), got nan"),
        ("0.1", TypeError, r"dropout_p must be a float in \[0, 1\), got str '0\.1'"),
        (None, TypeError, r"dropout_p must be a float in \[0, 1\), got NoneType None"),
        (True, TypeError, r"dropout_p must be a float in \[0, 1\), got bool True"),
    ],
    ids=["negative", "one", "above-one", "nan", "string", "none", "bool"],
)
def test_bad_dropout_p(dropout_p, error, message):
    q, k, v = sdpa_inputs()
    with pytest.raises(error, match=message):
        scaled_dot_product_sigmoid_attention(q, k, v, dropout_p=dropout_p)


# --------------------------------------------------------------------------------- softmax_scale


def flash_inputs():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, 4, 16, generator=gen, dtype=torch.float64)  # [B, S, H, D]
    k = torch.randn(2, 7, 2, 16, generator=gen, dtype=torch.float64)
    return q, k, torch.randn(2, 7, 2, 16, generator=gen, dtype=torch.float64)


def dense(**kw):
    return sigmoid_attn_func(*flash_inputs(), causal=True, **kw)


def varlen(**kw):
    q, k, v = (t.flatten(0, 1) for t in flash_inputs())
    cu_q, cu_k = torch.tensor([0, 5, 10], dtype=torch.int32), torch.tensor([0, 7, 14], dtype=torch.int32)
    return sigmoid_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 7, causal=True, **kw)


def kvcache(**kw):
    q, k, v = flash_inputs()
    return sigmoid_attn_with_kvcache(q[:, -1:], k, v, cache_seqlens=6, **kw)


FLASH_FUNCTIONS = {"sigmoid_attn_func": dense, "sigmoid_attn_varlen_func": varlen, "sigmoid_attn_with_kvcache": kvcache}


@pytest.mark.parametrize("name", list(FLASH_FUNCTIONS))
def test_softmax_scale_is_scale(name):
    call = FLASH_FUNCTIONS[name]
    with_scale = call(scale=0.11)
    assert not torch.equal(with_scale, call())  # 0.11 is not the default 1/sqrt(16): the scale matters here
    torch.testing.assert_close(call(softmax_scale=0.11), with_scale, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(FLASH_FUNCTIONS))
def test_scale_and_softmax_scale_together_is_an_error(name):
    both = r"scale and softmax_scale name the same argument .* got scale=0\.1 and softmax_scale=0\.2"
    with pytest.raises(ValueError, match=both):
        FLASH_FUNCTIONS[name](scale=0.1, softmax_scale=0.2)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (-1.0, ValueError, r"softmax_scale must be a finite number > 0 \(or None for 1 / sqrt\(headdim\)\), got -1\.0"),
        ("0.1", TypeError, r"softmax_scale must be a float or None, got str '0\.1'"),
    ],
    ids=["negative", "string"],
)
def test_bad_softmax_scale_is_named(value, error, message):
    with pytest.raises(error, match=message):
        dense(softmax_scale=value)


def test_flash_attn_keyword_call():
    """flash-attn's ``flash_attn_func(q, k, v, softmax_scale=..., causal=True)`` with the name swapped."""
    q, k, v = flash_inputs()
    out = sigattn.sigmoid_attn_func(q, k, v, softmax_scale=0.25, causal=True)
    torch.testing.assert_close(out, sigattn.sigmoid_attn_func(q, k, v, scale=0.25, causal=True), rtol=0, atol=0)
