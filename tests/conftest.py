"""Shared helpers for the sigattn tests: random inputs, readable case ids and the tolerance rule.

Test files import these helpers with ``from conftest import ...`` (pytest puts this folder on sys.path).

The tolerance rule (flash-attention's, ``sigattn.testing.tolerance``): an implementation's error against the
float64 reference is at most 2x the error of the reference computed in the inputs' own precision
(``upcast=False``: what plain PyTorch gets), plus a small absolute term (``ATOL``) for values that both get
exactly right.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch

# Without a GPU the Triton kernels can only run in Triton's interpreter (tests/test_flash.py relies on
# this); it must be set before triton is imported. Auto dispatch never picks the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sigattn.ops.sigmoid_attn.reference import sigmoid_attn_reference
from sigattn.testing.tolerance import ATOL, allowed_error, max_error, rounding_term

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_ID = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@dataclass(frozen=True)
class Case:
    """One attention shape and option set; ``id`` is its readable pytest id."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    alibi: str | None = None  # None, "H" for (Hq,) slopes, "BH" for (B, Hq)
    bias: str = "default"  # "default" (-log Sk), "float" or "tensor" (per head, gets a gradient)

    @property
    def id(self) -> str:
        parts = [f"B{self.batch}-Sq{self.seqlen_q}-Sk{self.seqlen_k}-H{self.heads}-Hkv{self.kv_heads}-D{self.head_dim}"]
        if self.causal:
            parts.append("causal")
        if self.window != (-1, -1):
            parts.append(f"win{self.window[0]}_{self.window[1]}")
        if self.alibi:
            parts.append(f"alibi{self.alibi}")
        if self.bias != "default":
            parts.append(f"bias{self.bias}")
        return "-".join(parts)

    def inputs(self, dtype=torch.float64, requires_grad=False) -> dict:
        """q, k, v and the options of this case, as keyword arguments of the reference / blocked path."""
        q = torch.randn(self.batch, self.seqlen_q, self.heads, self.head_dim, dtype=dtype)
        k = torch.randn(self.batch, self.seqlen_k, self.kv_heads, self.head_dim, dtype=dtype)
        v = torch.randn(self.batch, self.seqlen_k, self.kv_heads, self.head_dim, dtype=dtype)
        args = dict(q=q, k=k, v=v, causal=self.causal, window_size=self.window)
        args["alibi_slopes"] = alibi_slopes(self.alibi, self.batch, self.heads)
        if self.bias == "float":
            args["bias"] = -2.5
        elif self.bias == "tensor":
            args["bias"] = torch.linspace(-4.0, 0.5, self.heads, dtype=dtype)
        if requires_grad:
            for name in ("q", "k", "v", "bias"):
                if isinstance(args.get(name), torch.Tensor):
                    args[name].requires_grad_()
        return args


def alibi_slopes(kind: str | None, batch: int, heads: int) -> torch.Tensor | None:
    """float32 ALiBi slopes of shape (Hq,) ("H") or (B, Hq) ("BH"); positive and distinct per head."""
    if kind is None:
        return None
    slopes = torch.rand(heads) * 0.3 + 0.01
    if kind == "BH":
        return slopes[None] * torch.rand(batch, 1) * 2 + torch.rand(batch, heads) * 0.05
    return slopes


def ids(cases) -> list[str]:
    return [c.id for c in cases]


def grad_inputs(args: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every argument that requires grad, in a fixed order."""
    return [(n, t) for n, t in args.items() if isinstance(t, torch.Tensor) and t.requires_grad]


def forward_backward(fn, args: dict, dout: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """fn(**args) and the gradients of <fn(**args), dout> w.r.t. every input that requires grad."""
    out = fn(**args)
    named = grad_inputs(args)
    grads = torch.autograd.grad(out, [t for _, t in named], dout.to(out.dtype), allow_unused=True)
    return out.detach(), {n: g for (n, _), g in zip(named, grads, strict=True)}


def cast_args(args: dict, dtype: torch.dtype) -> dict:
    """A copy of args with q, k, v, a bias tensor and a float attn_mask cast to dtype as fresh leaves."""
    out = dict(args)
    for name in ("q", "k", "v", "bias", "attn_mask"):
        t = args.get(name)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out[name] = t.detach().to(dtype).requires_grad_(t.requires_grad)
    return out


def assert_within_tolerance_rule(name: str, got: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor, dtype):
    """|got - truth| <= 2 |baseline - truth| + ATOL[dtype], as maximum absolute errors over the tensor (a NaN
    error is infinite); a baseline with an infinite error would allow anything, and fails."""
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert torch.equal(torch.isfinite(got), torch.isfinite(truth)), f"{name}: non-finite values differ"
    err, base = max_error(got, truth), max_error(baseline, truth)
    assert base < math.inf, f"{name}: PyTorch {dtype}'s result is NaN or infinite where the truth is not"
    assert err <= allowed_error(base, ATOL[dtype]), (
        f"{name}: error {err:.3g} > 2 * PyTorch {dtype} error {base:.3g} + {ATOL[dtype]}"
    )


def assert_within_backend_rule(name, got, truth, baseline, dtype, backend: str) -> None:
    """The tolerance rule with the GPU grid's term for the kernels (backend "triton": they accumulate in float32
    and round P to 16 bits, then the result once: ``rounding_term``) and the CPU tests' ATOL for the PyTorch
    backends."""
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    term = rounding_term(truth, dtype) if backend == "triton" else ATOL[dtype]
    err, base = max_error(got, truth), max_error(baseline, truth)
    assert err <= allowed_error(base, term), f"{name}: error {err:.3g} > 2 * PyTorch {dtype} {base:.3g} + {term:.3g}"


def check_against_reference(fn, args: dict, dtype: torch.dtype, seed: int = 1) -> None:
    """fn (same arguments as ``sigmoid_attn_reference``) on ``args`` cast to ``dtype``, forward and every
    gradient: exact to 1e-10 for float64, within the tolerance rule otherwise; the output has q's dtype.

    The truth is the float64 reference on the very same (rounded) inputs and output gradient."""
    test_args = cast_args(args, dtype)
    truth_args = cast_args(test_args, torch.float64)
    gen = torch.Generator().manual_seed(seed)
    out_shape = (*args["q"].shape[:-1], args["v"].shape[-1])  # v's head dim: the output's
    dout = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype)
    truth, truth_grads = forward_backward(lambda **a: sigmoid_attn_reference(**a, upcast=True), truth_args, dout)
    got, got_grads = forward_backward(fn, test_args, dout)
    assert got.dtype == dtype, f"output dtype {got.dtype}, expected {dtype}"
    assert set(got_grads) == set(truth_grads)
    if dtype == torch.float64:
        torch.testing.assert_close(got, truth, atol=1e-10, rtol=1e-10, msg=lambda m: f"out: {m}")
        for n, g in got_grads.items():
            assert g is not None, f"no gradient for {n}"
            assert g.dtype == test_args[n].dtype
            torch.testing.assert_close(g, truth_grads[n], atol=1e-10, rtol=1e-10, msg=lambda m, n=n: f"d{n}: {m}")
        return
    base_args = cast_args(args, dtype)
    baseline, base_grads = forward_backward(lambda **a: sigmoid_attn_reference(**a, upcast=False), base_args, dout)
    assert_within_tolerance_rule("out", got, truth, baseline, dtype)
    for n, g in got_grads.items():
        assert g is not None, f"no gradient for {n}"
        assert g.dtype == test_args[n].dtype, f"d{n} dtype {g.dtype}"
        assert_within_tolerance_rule(f"d{n}", g, truth_grads[n], base_grads[n], dtype)
