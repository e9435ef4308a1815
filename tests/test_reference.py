"""The reference (the specification) against an independent float64 formula.

``naive_sigmoid_attn`` below is written from the docstrings of ``sigattn.functional`` alone, one
(b, h, i, j) at a time in numpy float64; it shares no code with ``sigattn``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import Case, ids

from sigattn.ops.sigmoid_attn.reference import Mask, allowed_keys, sigmoid_attn_reference


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def naive_sigmoid_attn(
    q,
    k,
    v,
    *,
    scale=None,
    bias=None,
    causal=False,
    window_size=(-1, -1),
    alibi_slopes=None,
    seqlens_k=None,
    top_left=False,
    attn_mask=None,
):
    """out[b, i, h] = sum over allowed j of sigmoid(logit) * v[b, j, h // G], computed one term at a time."""
    q, k, v = (np.asarray(t.detach().double()) for t in (q, k, v))
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    slopes = None if alibi_slopes is None else np.asarray(alibi_slopes.double())
    if slopes is not None and slopes.ndim == 1:
        slopes = np.broadcast_to(slopes, (batch, num_heads))
    mask = None
    if attn_mask is not None:
        mask = np.broadcast_to(np.asarray(attn_mask.detach()), (batch, num_heads, seqlen_q, seqlen_k))
    left, right = window_size
    if causal:
        right = 0
    out = np.zeros((batch, seqlen_q, num_heads, head_dim))
    for b in range(batch):
        n_keys = seqlen_k if seqlens_k is None else int(seqlens_k[b])
        off = 0 if top_left else n_keys - seqlen_q
        for h in range(num_heads):
            if bias is None:
                bias_h = -math.log(n_keys) if n_keys > 0 else 0.0
            elif isinstance(bias, torch.Tensor):
                bias_h = float(bias[h])
            else:
                bias_h = float(bias)
            slope = 0.0 if slopes is None else float(slopes[b, h])
            hk = h // group
            for i in range(seqlen_q):
                for j in range(n_keys):
                    if left >= 0 and j < i + off - left:
                        continue
                    if right >= 0 and j > i + off + right:
                        continue
                    if mask is not None and mask.dtype == np.bool_ and not mask[b, h, i, j]:
                        continue
                    logit = scale * float(np.dot(q[b, i, h], k[b, j, hk])) + bias_h - slope * abs(i + off - j)
                    if mask is not None and mask.dtype != np.bool_:
                        logit += float(mask[b, h, i, j])
                    out[b, i, h] += _sigmoid(logit) * v[b, j, hk]
    return torch.from_numpy(out)


CASES = [
    Case(1, 1, 1, 1, 1, 4),
    Case(2, 5, 7, 3, 3, 8, bias="float"),
    Case(2, 6, 6, 4, 4, 8, bias="tensor"),
    Case(2, 6, 6, 4, 4, 8, causal=True),
    Case(2, 3, 9, 4, 2, 8, causal=True),  # GQA, Sq < Sk: the diagonal sits at key i + 6
    Case(2, 9, 4, 2, 1, 8, causal=True),  # MQA, Sq > Sk: the first 5 rows see no key
    Case(1, 8, 8, 2, 2, 8, window=(2, 1)),
    Case(1, 7, 10, 2, 2, 8, window=(-1, 0)),
    Case(1, 7, 10, 2, 2, 8, window=(3, -1)),
    Case(1, 7, 10, 2, 1, 8, causal=True, window=(2, 5)),  # causal overrides right to 0
    Case(1, 5, 5, 2, 2, 8, window=(0, 0)),
    Case(1, 10, 4, 2, 2, 8, window=(1, 1)),  # Sq > Sk: rows far above the diagonal see nothing
    Case(2, 6, 8, 4, 2, 8, alibi="H"),
    Case(2, 6, 8, 4, 1, 8, causal=True, alibi="BH"),
    Case(2, 7, 5, 4, 2, 8, window=(1, 2), alibi="BH", bias="tensor"),
]


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_reference_matches_naive_formula(case):
    args = case.inputs()
    out = sigmoid_attn_reference(**args)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, naive_sigmoid_attn(**args), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("scale", [0.3, -1.7])
def test_reference_explicit_scale(scale):
    args = Case(2, 4, 6, 2, 1, 8, causal=True, bias="float").inputs()
    torch.testing.assert_close(
        sigmoid_attn_reference(**args, scale=scale),
        naive_sigmoid_attn(**args, scale=scale),
        atol=1e-12,
        rtol=1e-12,
    )


def test_default_bias_is_minus_log_seqlen_k():
    args = Case(2, 5, 11, 2, 2, 8).inputs()
    explicit = sigmoid_attn_reference(**args, bias=-math.log(11))
    torch.testing.assert_close(sigmoid_attn_reference(**args), explicit, atol=0, rtol=0)
    assert not torch.allclose(sigmoid_attn_reference(**args, bias=0.0), explicit)


def test_causal_rows_without_keys_output_exactly_zero():
    # Sq = 9, Sk = 4, bottom-right: query i sees keys j <= i - 5, so rows 0..4 see nothing.
    args = Case(2, 9, 4, 2, 1, 8, causal=True).inputs()
    out = sigmoid_attn_reference(**args)
    assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5]))
    assert (out[:, 5:].abs().sum(-1) > 0).all()
    low = sigmoid_attn_reference(**{**args, **{n: args[n].float() for n in "qkv"}}, upcast=False)
    assert torch.equal(low[:, :5], torch.zeros_like(low[:, :5]))


@pytest.mark.parametrize("top_left", [False, True], ids=["bottom_right", "top_left"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seqlens_k(causal, top_left):
    """Keys at or past seqlens_k[b] are not keys: the offset and default bias use seqlens_k[b], and NaN
    stored there does not leak."""
    args = Case(3, 4, 9, 4, 2, 8, causal=causal, alibi="BH").inputs()
    seqlens_k = torch.tensor([9, 3, 0], dtype=torch.int32)
    for t in (args["k"], args["v"]):
        t[1, 3:] = float("nan")
        t[2] = float("nan")
    out = sigmoid_attn_reference(**args, seqlens_k=seqlens_k, top_left=top_left)
    assert torch.isfinite(out).all()
    expected = naive_sigmoid_attn(**args, seqlens_k=seqlens_k, top_left=top_left)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    # Row 1 is the same as attending to its first 3 keys alone.
    row1 = {**args, "k": args["k"][1:2, :3], "v": args["v"][1:2, :3], "q": args["q"][1:2]}
    row1["alibi_slopes"] = args["alibi_slopes"][1:2]
    torch.testing.assert_close(out[1:2], sigmoid_attn_reference(**row1, top_left=top_left), atol=1e-12, rtol=1e-12)


MASK_SHAPES = [(2, 4, 6, 9), (1, 4, 6, 9), (2, 1, 6, 9), (6, 9), (9,)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=["x".join(map(str, s)) for s in MASK_SHAPES])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_attn_mask(kind, shape):
    args = Case(2, 6, 9, 4, 2, 8, bias="tensor").inputs()
    if kind == "bool":
        mask = torch.rand(shape) > 0.4
    else:
        mask = torch.randn(shape, dtype=torch.float64)
        mask[torch.rand(shape) > 0.7] = float("-inf")
    mask4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    out = sigmoid_attn_reference(**args, attn_mask=mask4, top_left=True)
    torch.testing.assert_close(out, naive_sigmoid_attn(**args, attn_mask=mask4, top_left=True), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("seqlens", [(6, 9), (9, 4)], ids=["Sq6-Sk9", "Sq9-Sk4"])
def test_top_left_causal(seqlens):
    """SDPA's is_causal: query i sees key j iff j <= i, whatever Sq and Sk."""
    sq, sk = seqlens
    args = Case(2, sq, sk, 2, 2, 8, causal=True).inputs()
    out = sigmoid_attn_reference(**args, top_left=True)
    torch.testing.assert_close(out, naive_sigmoid_attn(**args, top_left=True), atol=1e-12, rtol=1e-12)
    bool_mask = torch.ones(sq, sk, dtype=torch.bool).tril()
    no_causal = {**args, "causal": False}
    torch.testing.assert_close(out, sigmoid_attn_reference(**no_causal, attn_mask=bool_mask, top_left=True))


def test_mask_pictures_in_the_docstring():
    """The two causal masks drawn in sigattn.functional's docstring (bottom-right aligned)."""

    def causal_mask(sq, sk):
        return allowed_keys(sq, sk, torch.tensor([sk]), Mask(causal=True))[0, 0].int()

    assert causal_mask(2, 5).tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert causal_mask(5, 2).tolist() == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]
    window = allowed_keys(3, 6, torch.tensor([6]), Mask(window=(1, 0)))[0, 0].int()
    assert window.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_upcast_flag(dtype):
    args = Case(1, 5, 7, 2, 1, 16, causal=True, alibi="H", bias="tensor").inputs()
    low = {**args, **{n: args[n].to(dtype) for n in ("q", "k", "v")}}
    truth = sigmoid_attn_reference(**args)
    up = sigmoid_attn_reference(**low, upcast=True)
    assert up.dtype == torch.float64
    same = sigmoid_attn_reference(**low, upcast=False)
    assert same.dtype == dtype
    # Upcasting removes all error but the inputs' rounding; same-precision math adds its own.
    assert (same.double() - truth).abs().max() < {torch.float32: 1e-5}.get(dtype, 0.1)
    torch.testing.assert_close(up, naive_sigmoid_attn(**low), atol=1e-12, rtol=1e-12)
