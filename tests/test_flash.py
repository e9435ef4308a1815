"""The Triton kernels, run on the CPU through TRITON_INTERPRET=1 (conftest sets it) or on a GPU.

The full grid runs on the GPU with ``python -m sigattn.check``; here a slice of it forces every kernel
path: unmasked and masked tiles, ragged tiles, padded head dims, GQA/MQA, ALiBi, per-head bias.
"""

from __future__ import annotations

import math

import pytest
import torch

import sigattn
from sigattn.check import Case, run_case
from sigattn.ops.sigmoid_attn import flash
from sigattn.ops.sigmoid_attn.reference import sigmoid_attn_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    Case(1, 1, 1, 2, 1, 32),
    Case(2, 17, 17, 4, 2, 32, causal=True),
    Case(1, 33, 50, 4, 1, 16, window=(7, 3)),
    Case(1, 50, 20, 2, 2, 32, causal=True),  # Sq > Sk: the first rows see no key and output 0
    Case(1, 40, 37, 2, 1, 24, dtype="float16", causal=True, window=(9, -1)),
    Case(1, 37, 45, 4, 2, 32, alibi=True, head_bias=True),
    Case(1, 45, 37, 2, 1, 40, causal=True, top_left=True),
    Case(1, 31, 31, 2, 2, 64, dtype="float16", window=(-1, 0)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernels_within_twice_pytorch_error(case):
    row = run_case(case, DEVICE)
    errors = {k: v for k, v in row.items() if k.endswith("_err")}
    assert row["ok"], errors


def test_exact_logic_in_float32():
    """In float32 the interpreter's dots are exact fp32, so every mask and index is checked to ~1e-6."""
    if DEVICE != "cpu":
        pytest.skip("float32 runs the exact-arithmetic check in the interpreter only")
    gen = torch.Generator().manual_seed(1)
    for (sq, sk), causal, window, top_left in [
        ((40, 5), True, (-1, -1), False),
        ((5, 40), False, (3, 0), False),
        ((33, 50), True, (20, -1), True),
        ((50, 33), False, (0, 0), False),
    ]:
        q = torch.randn(2, sq, 4, 24, generator=gen, requires_grad=True)
        k = torch.randn(2, sk, 2, 24, generator=gen, requires_grad=True)
        v = torch.randn(2, sk, 2, 24, generator=gen, requires_grad=True)
        bias = torch.randn(4, generator=gen, requires_grad=True)
        alibi = torch.rand(2, 4, generator=gen)
        kw = dict(scale=0.3, bias=bias, causal=causal, window_size=window, top_left=top_left, alibi_slopes=alibi)
        out = flash.sigmoid_attn_flash(q, k, v, **kw)
        ref = sigmoid_attn_reference(q, k, v, **kw)
        g = torch.randn(out.shape, generator=gen)
        grads = torch.autograd.grad(out, (q, k, v, bias), g)
        ref_grads = torch.autograd.grad(ref, (q, k, v, bias), g.double())
        for mine, truth in zip((out, *grads), (ref, *ref_grads), strict=True):
            assert (mine.double() - truth).abs().max().item() < 1e-4


def test_public_api_runs_on_triton_backend(monkeypatch):
    monkeypatch.setenv("SIGATTN_BACKEND", "triton")
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 19, 4, 32, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    k = torch.randn(1, 23, 2, 32, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    v = torch.randn(1, 23, 2, 32, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    out = sigattn.sigmoid_attn_func(q, k, v, causal=True)
    sdpa = sigattn.scaled_dot_product_sigmoid_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    with sigattn.use_backend("torch"):
        expected = sigattn.sigmoid_attn_func(q, k, v, causal=True)
        expected_sdpa = sigattn.scaled_dot_product_sigmoid_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(sdpa, expected_sdpa, atol=3e-2, rtol=2e-2)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_backward_is_deterministic():
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 37, 4, 32, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(4))
    bias = torch.randn(4, generator=gen).to(DEVICE)
    params, head_bias = flash.flash_params(37, scale=0.2, bias=bias, causal=True, window_size=(-1, -1))
    first = flash.flash_bwd(do, q, k, v, params, head_bias)
    second = flash.flash_bwd(do, q, k, v, params, head_bias)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_every_output_element_written():
    """Poisoned buffers: a row with no allowed key must still be written (as 0)."""
    q, k, v = (torch.randn(1, 20, 2, 16).to(DEVICE, torch.float16) for _ in range(3))
    params, _ = flash.flash_params(20, scale=0.25, bias=None, causal=True, window_size=(-1, -1), top_left=False)
    out = torch.full_like(q, math.nan)
    flash.flash_fwd(q, k[:, :4], v[:, :4], params, out=out)
    assert not out.isnan().any()
    assert (out[:, :16] == 0).all()  # Sq=20, Sk=4: rows 0..15 see nothing


def test_triton_backend_declines_with_reasons():
    from sigattn.backends import BACKENDS, AttnCall

    q = torch.randn(1, 4, 2, 300, dtype=torch.float64)
    call = AttnCall("varlen", q, q, q, 1.0, None, False, (-1, -1), None, False)
    reasons = " ".join(BACKENDS["triton"].not_supported_reasons(call))
    assert "float64" in reasons and "head dim 300" in reasons and "varlen" in reasons


def test_compiles_without_graph_breaks():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 17, 2, 16, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(3))
    bias = torch.randn(2, generator=gen).to(DEVICE).requires_grad_()

    def f(q, k, v, bias):
        return flash.sigmoid_attn_flash(q, k, v, scale=0.25, bias=bias, causal=True, window_size=(-1, -1))

    compiled = torch.compile(f, fullgraph=True, backend="eager" if DEVICE == "cpu" else "inductor")
    out = compiled(q, k, v, bias)
    torch.testing.assert_close(out, f(q, k, v, bias))
    out.float().sum().backward()
    assert bias.grad is not None and bias.grad.shape == (2,)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(0, 5), (5, 0)], ids=["Sq0", "Sk0"])
def test_empty_sequences(monkeypatch, seqlen_q, seqlen_k):
    monkeypatch.setenv("SIGATTN_BACKEND", "triton")
    q = torch.randn(1, seqlen_q, 2, 16).to(DEVICE, torch.bfloat16).requires_grad_()
    k = torch.randn(1, seqlen_k, 2, 16).to(DEVICE, torch.bfloat16).requires_grad_()
    v = torch.randn(1, seqlen_k, 2, 16).to(DEVICE, torch.bfloat16).requires_grad_()
    out = sigattn.sigmoid_attn_func(q, k, v)
    assert out.shape == q.shape and (out == 0).all()
    out.float().sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


def test_public_functions_compile_without_graph_breaks(monkeypatch):
    """The dispatcher (backend choice, checks) traces under fullgraph=True; the kernels are opaque ops."""
    monkeypatch.setenv("SIGATTN_BACKEND", "triton")
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 17, 2, 16, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(3))
    bias = torch.randn(2, generator=gen).to(DEVICE)

    def f(q, k, v):
        flash_layout = sigattn.sigmoid_attn_func(q, k, v, causal=True, bias=bias)
        sdpa_layout = sigattn.scaled_dot_product_sigmoid_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return flash_layout, sdpa_layout

    compiled = torch.compile(f, fullgraph=True, backend="eager" if DEVICE == "cpu" else "inductor")
    for got, expected in zip(compiled(q, k, v), f(q, k, v), strict=True):
        torch.testing.assert_close(got, expected)
