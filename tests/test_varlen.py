"""``sigmoid_attn_varlen_func``: each packed sequence is attended on its own, exactly as
``sigmoid_attn_func`` on a batch of one (default bias -log of its own key length)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import alibi_slopes, forward_backward

import sigattn
from sigattn import sigmoid_attn_func, sigmoid_attn_varlen_func
from sigattn.ops.sigmoid_attn.reference import sigmoid_attn_reference


@dataclass(frozen=True)
class VarlenCase:
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int = 16
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    alibi: str | None = None
    bias: str = "default"

    @property
    def id(self) -> str:
        lq, lk = "_".join(map(str, self.lens_q)), "_".join(map(str, self.lens_k))
        parts = [f"B{len(self.lens_q)}-Sq{lq}-Sk{lk}-H{self.heads}-Hkv{self.kv_heads}-D{self.head_dim}"]
        parts += ["causal"] if self.causal else []
        parts += [f"win{self.window[0]}_{self.window[1]}"] if self.window != (-1, -1) else []
        parts += [f"alibi{self.alibi}"] if self.alibi else []
        parts += [f"bias{self.bias}"] if self.bias != "default" else []
        return "-".join(parts)

    def inputs(self, dtype=torch.float64) -> tuple[dict, dict]:
        """(packed tensors and cu_seqlens, options)."""
        q = torch.randn(sum(self.lens_q), self.heads, self.head_dim, dtype=dtype, requires_grad=True)
        k = torch.randn(sum(self.lens_k), self.kv_heads, self.head_dim, dtype=dtype, requires_grad=True)
        v = torch.randn(sum(self.lens_k), self.kv_heads, self.head_dim, dtype=dtype, requires_grad=True)
        opts = dict(causal=self.causal, window_size=self.window)
        opts["alibi_slopes"] = alibi_slopes(self.alibi, len(self.lens_q), self.heads)
        if self.bias == "float":
            opts["bias"] = -3.0
        elif self.bias == "tensor":
            opts["bias"] = torch.linspace(-3.0, 0.0, self.heads, dtype=dtype, requires_grad=True)
        return dict(q=q, k=k, v=v), opts


def cu_seqlens(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def varlen(case: VarlenCase, tensors: dict, opts: dict, max_extra: int = 0) -> torch.Tensor:
    return sigmoid_attn_varlen_func(
        tensors["q"],
        tensors["k"],
        tensors["v"],
        cu_seqlens(case.lens_q),
        cu_seqlens(case.lens_k),
        max(case.lens_q) + max_extra,
        max(case.lens_k) + max_extra,
        **opts,
    )


def per_sequence_loop(case: VarlenCase, tensors: dict, opts: dict) -> torch.Tensor:
    """sigmoid_attn_func on each sequence as a batch of one, concatenated."""
    outs, sq, sk = [], 0, 0
    for b, (lq, lk) in enumerate(zip(case.lens_q, case.lens_k, strict=True)):
        seq_opts = dict(opts)
        slopes = opts["alibi_slopes"]
        if slopes is not None and slopes.dim() == 2:
            seq_opts["alibi_slopes"] = slopes[b]
        q = tensors["q"][sq : sq + lq][None]
        k, v = (tensors[n][sk : sk + lk][None] for n in "kv")
        outs.append(sigmoid_attn_func(q, k, v, **seq_opts)[0])
        sq, sk = sq + lq, sk + lk
    return torch.cat(outs)


CASES = [
    VarlenCase((5, 0, 17, 1, 33), (7, 3, 0, 1, 40), 4, 2, causal=True, alibi="BH"),
    VarlenCase((17, 9), (17, 30), 2, 1, bias="tensor"),
    VarlenCase((33, 4, 0), (10, 4, 0), 2, 2, window=(3, 2), bias="float"),
    VarlenCase((1, 1, 1), (113, 0, 9), 4, 1, causal=True, alibi="H"),  # decode-like, MQA
    VarlenCase((40, 9), (17, 9), 2, 2, causal=True, window=(4, -1)),  # Sq > Sk: rows with no key
]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_varlen_equals_per_sequence_loop(case, backend):
    tensors, opts = case.inputs()
    grad_args = {**tensors, **({"bias": opts["bias"]} if case.bias == "tensor" else {})}
    dout = torch.randn(tensors["q"].shape, dtype=torch.float64)
    with sigattn.use_backend(backend):
        out, grads = forward_backward(lambda **a: varlen(case, tensors, opts), grad_args, dout)
        loop, loop_grads = forward_backward(lambda **a: per_sequence_loop(case, tensors, opts), grad_args, dout)
    assert out.shape == tensors["q"].shape
    torch.testing.assert_close(out, loop, atol=1e-12, rtol=1e-12)
    for n, g in grads.items():
        assert g is not None and g.shape == grad_args[n].shape, n
        torch.testing.assert_close(g, loop_grads[n], atol=1e-12, rtol=1e-12, msg=lambda m, n=n: f"d{n}: {m}")


def test_varlen_default_bias_is_per_sequence():
    """bias=None is -log of each sequence's own key length, not of the packed total or the maximum."""
    case = VarlenCase((6, 6), (9, 25), 2, 2)
    tensors, opts = case.inputs()
    with sigattn.use_backend("torch"):
        out = varlen(case, tensors, opts, max_extra=5)
    q, k, v = (t.detach() for t in tensors.values())
    first = sigmoid_attn_reference(q[None, :6], k[None, :9], v[None, :9], bias=-math.log(9))[0]
    second = sigmoid_attn_reference(q[None, 6:], k[None, 9:], v[None, 9:], bias=-math.log(25))[0]
    torch.testing.assert_close(out, torch.cat([first, second]), atol=1e-10, rtol=1e-10)


def test_varlen_empty_key_sequences_output_zero():
    case = VarlenCase((4, 3, 5), (6, 0, 2), 2, 1, causal=True)
    tensors, opts = case.inputs()
    with sigattn.use_backend("torch"):
        out = varlen(case, tensors, opts)
    assert torch.equal(out[4:7], torch.zeros_like(out[4:7]))  # sequence 1 has no keys
    assert torch.equal(out[7:10], torch.zeros_like(out[7:10]))  # Sq = 5 > Sk = 2: 3 rows see nothing
    assert (out[10:].abs().sum(-1) > 0).all()
    out.backward(torch.ones_like(out))
    assert torch.isfinite(tensors["q"].grad).all() and torch.equal(tensors["q"].grad[4:10], torch.zeros(6, 2, 16))


def test_varlen_equal_lengths_match_dense_batch():
    case = VarlenCase((20, 20), (31, 31), 4, 2, causal=True, alibi="BH")
    tensors, opts = case.inputs()
    with sigattn.use_backend("torch"):
        out = varlen(case, tensors, opts)
        dense = sigmoid_attn_func(
            tensors["q"].reshape(2, 20, 4, 16),
            tensors["k"].reshape(2, 31, 2, 16),
            tensors["v"].reshape(2, 31, 2, 16),
            **opts,
        )
    torch.testing.assert_close(out, dense.reshape(40, 4, 16), atol=1e-12, rtol=1e-12)


def test_varlen_no_sequences():
    q = torch.randn(0, 2, 16)
    k = torch.randn(0, 2, 16)
    zero = torch.zeros(1, dtype=torch.int32)
    out = sigmoid_attn_varlen_func(q, k, k, zero, zero, 0, 0)
    assert out.shape == (0, 2, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_varlen_low_precision_dtype(dtype):
    case = VarlenCase((5, 0, 17), (7, 3, 30), 4, 2, causal=True)
    tensors, opts = case.inputs(dtype)
    with sigattn.use_backend("torch"):
        out = varlen(case, tensors, opts)
        loop = per_sequence_loop(case, tensors, opts)
    assert out.dtype == dtype
    assert torch.equal(out, loop)
