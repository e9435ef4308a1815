"""The memory-efficient CPU path (``sigmoid_attn_blocked`` and the public functions on the "torch"
backend) against the reference: forward and every gradient.

float64 inputs must match the float64 reference to 1e-10; float32 / bfloat16 / float16 inputs follow the
tolerance rule (conftest.py). ``block=16`` makes small inputs cross many tiles, with ragged last tiles.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPE_ID, LOW_PRECISION, Case, check_against_reference, forward_backward, ids

import sigattn
from sigattn import scaled_dot_product_sigmoid_attention, sigmoid_attn_func
from sigattn.ops.sigmoid_attn import blocked
from sigattn.ops.sigmoid_attn.blocked import sigmoid_attn_blocked
from sigattn.ops.sigmoid_attn.reference import Mask, sigmoid_attn_reference

BLOCK = 16

CASES = [
    Case(1, 1, 1, 1, 1, 16),
    Case(2, 1, 17, 4, 1, 16, causal=True),  # MQA decode
    Case(2, 17, 17, 4, 4, 16, causal=True, bias="tensor"),
    Case(2, 17, 113, 4, 2, 16, window=(5, 3), bias="float"),
    Case(2, 113, 17, 4, 1, 32, causal=True, alibi="BH"),  # Sq > Sk: the first 96 rows see no key
    Case(2, 113, 203, 8, 2, 32, causal=True),
    Case(1, 113, 113, 2, 2, 16, window=(31, -1), alibi="H", bias="tensor"),
    Case(1, 113, 113, 4, 2, 16, causal=True, window=(20, 7)),
    Case(1, 255, 255, 2, 1, 32, causal=True, alibi="H", bias="tensor"),
    Case(1, 255, 113, 2, 2, 16, window=(-1, 40)),
]
LOW_PRECISION_CASES = [CASES[2], CASES[4], CASES[6], CASES[8]]


def blocked_fn(*, causal=False, window_size=(-1, -1), top_left=False, block=BLOCK, **args):
    """``sigmoid_attn_blocked`` called with the public functions' mask arguments (as the cases give them)."""
    return sigmoid_attn_blocked(**args, mask=Mask(causal, tuple(window_size), top_left), block=block)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_blocked_float64_exact(case):
    check_against_reference(blocked_fn, case.inputs(requires_grad=True), torch.float64)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=[DTYPE_ID[d] for d in LOW_PRECISION])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=ids(LOW_PRECISION_CASES))
def test_blocked_low_precision(case, dtype):
    check_against_reference(blocked_fn, case.inputs(requires_grad=True), dtype)


@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_blocked_tile_size_does_not_change_the_result(block):
    args = Case(1, 113, 203, 4, 2, 16, causal=True, alibi="H", bias="tensor").inputs(requires_grad=True)
    dout = torch.randn_like(args["q"])
    out, grads = forward_backward(lambda **a: blocked_fn(**a, block=block), args, dout)
    ref, ref_grads = forward_backward(lambda **a: sigmoid_attn_reference(**a), args, dout)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-10, rtol=1e-10)


def test_seqlens_k_and_top_left():
    """The options only the kvcache and SDPA paths use: per-row key counts (with NaN past them) and
    top-left alignment."""
    args = Case(3, 17, 40, 4, 2, 16, causal=True, alibi="BH").inputs(requires_grad=True)
    with torch.no_grad():
        args["k"][1, 20:] = float("nan")
        args["v"][2, 5:] = float("nan")
    args["seqlens_k"] = torch.tensor([40, 20, 5], dtype=torch.int32)
    for top_left in (False, True):
        check_against_reference(blocked_fn, {**args, "top_left": top_left}, torch.float64)
    check_against_reference(blocked_fn, args, torch.float32)


def _flash_to_sdpa(fn_sdpa):
    """Wraps the SDPA-layout function to take the reference's arguments (flash layout, top-left)."""

    def run(q, k, v, *, causal=False, bias=None, attn_mask=None, top_left=True):
        assert top_left
        out = fn_sdpa(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            is_causal=causal,
            bias=bias,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)

    return run


SDPA_MASK_SHAPES = [
    (2, 4, 17, 33),
    (1, 4, 17, 33),
    (2, 1, 17, 33),
    (1, 1, 17, 33),
    (1, 1, 1, 33),
    (2, 4, 17, 1),
]


@pytest.mark.parametrize("shape", SDPA_MASK_SHAPES, ids=["x".join(map(str, s)) for s in SDPA_MASK_SHAPES])
def test_float_attn_mask_gradient(shape):
    """A float attn_mask is added to the logits and gets a gradient, summed over its broadcast dims."""
    args = Case(2, 17, 33, 4, 2, 16, bias="tensor").inputs(requires_grad=True)
    del args["window_size"], args["alibi_slopes"]
    mask = torch.randn(shape, dtype=torch.float64)
    mask[torch.rand(shape) > 0.8] = float("-inf")
    args.update(attn_mask=mask.requires_grad_(), top_left=True)
    check_against_reference(blocked_fn, args, torch.float64)
    with sigattn.use_backend("torch"):
        check_against_reference(_flash_to_sdpa(scaled_dot_product_sigmoid_attention), args, torch.float64)
        check_against_reference(_flash_to_sdpa(scaled_dot_product_sigmoid_attention), args, torch.float32)


@pytest.mark.parametrize("causal", [False, True], ids=["bool_mask", "is_causal"])
@pytest.mark.parametrize("seqlens", [(17, 33), (33, 17)], ids=["Sq17-Sk33", "Sq33-Sk17"])
def test_sdpa_bool_mask_and_is_causal(seqlens, causal):
    sq, sk = seqlens
    args = Case(2, sq, sk, 4, 1, 16, causal=causal).inputs(requires_grad=True)
    del args["window_size"], args["alibi_slopes"]
    args["top_left"] = True
    if not causal:
        args["attn_mask"] = torch.rand(2, 1, sq, sk) > 0.5
    with sigattn.use_backend("torch"):
        for dtype in (torch.float64, torch.bfloat16):
            check_against_reference(_flash_to_sdpa(scaled_dot_product_sigmoid_attention), args, dtype)


@pytest.mark.parametrize("mask_dims", [2, 1], ids=["mask_Sq_Sk", "mask_Sk"])
def test_sdpa_low_rank_attn_mask(mask_dims):
    """A 2-D (Sq, Sk) or 1-D (Sk,) mask broadcasts like SDPA's; its gradient has its own shape."""
    q, k, v = (torch.randn(2, 4, 9, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.randn((9, 9)[-mask_dims:], dtype=torch.float64, requires_grad=True)
    with sigattn.use_backend("torch"):
        out = scaled_dot_product_sigmoid_attention(q, k, v, attn_mask=mask)
    mask4 = mask.reshape((1,) * (4 - mask_dims) + tuple(mask.shape))
    ref = sigmoid_attn_reference(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask4, top_left=True)
    ref = ref.transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, mask), dout)
    want = torch.autograd.grad(ref, (q, k, v, mask), dout)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


PUBLIC_CASES = [
    Case(2, 17, 113, 4, 2, 16, causal=True, alibi="H", bias="tensor"),
    Case(2, 113, 17, 4, 1, 16, window=(9, 2), alibi="BH"),
    Case(1, 255, 255, 2, 2, 16, causal=True, bias="float"),
]


@pytest.mark.parametrize(
    "dtype",
    [torch.float64, *LOW_PRECISION],
    ids=[DTYPE_ID[torch.float64]] + [DTYPE_ID[d] for d in LOW_PRECISION],
)
@pytest.mark.parametrize("case", PUBLIC_CASES, ids=ids(PUBLIC_CASES))
def test_sigmoid_attn_func_torch_backend(case, dtype, monkeypatch):
    # A tiny tile budget makes the public function's own block choice cross many tiles.
    monkeypatch.setattr(blocked, "_TILE_BUDGET", 256)
    assert blocked.block_size(case.batch * case.heads) == 16
    with sigattn.use_backend("torch"):
        check_against_reference(sigmoid_attn_func, case.inputs(requires_grad=True), dtype)


def test_sigmoid_attn_func_default_tiling():
    with sigattn.use_backend("torch"):
        check_against_reference(sigmoid_attn_func, PUBLIC_CASES[0].inputs(requires_grad=True), torch.float64)


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as t (B, S, H, D) in a transposed, strided view."""
    wide = torch.empty(t.shape[0], t.shape[2], t.shape[1], 2 * t.shape[3], dtype=t.dtype)
    wide[..., ::2] = t.detach().transpose(1, 2)
    view = wide.transpose(1, 2)[..., ::2]
    assert not view.is_contiguous()
    return view.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_noncontiguous_inputs(dtype):
    args = Case(2, 33, 47, 4, 2, 16, causal=True, alibi="H", bias="tensor").inputs(dtype, requires_grad=True)
    strided = {**args, **{n: _noncontiguous(args[n]) for n in "qkv"}}
    dout = torch.randn_like(args["q"])
    with sigattn.use_backend("torch"):
        out, grads = forward_backward(sigmoid_attn_func, args, dout)
        out_s, grads_s = forward_backward(sigmoid_attn_func, strided, dout)
        out_b, grads_b = forward_backward(blocked_fn, strided, dout)
        # The gradient arriving at the output may be non-contiguous too.
        out_t = sigmoid_attn_func(**strided)
        (dq_t,) = torch.autograd.grad(out_t, strided["q"], _noncontiguous(dout))
    # float64 matmuls may round the last bit differently for other strides; the rest computes in float32
    # from a contiguous copy, so it is bit-identical.
    tol = 1e-12 if dtype == torch.float64 else 0.0
    torch.testing.assert_close(out, out_s, atol=tol, rtol=tol)
    torch.testing.assert_close(dq_t, grads["q"], atol=tol, rtol=tol)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_s[n], atol=tol, rtol=tol)
    if dtype == torch.float64:  # other tiles sum in another order: equal up to rounding
        torch.testing.assert_close(out, out_b, atol=1e-10, rtol=0)
        for n in grads:
            torch.testing.assert_close(grads[n], grads_b[n], atol=1e-10, rtol=0)


def test_deterministic_runs_are_bit_identical():
    args = Case(2, 113, 113, 4, 2, 16, causal=True).inputs(torch.float32, requires_grad=True)
    dout = torch.randn_like(args["q"])
    with sigattn.use_backend("torch"):
        first = forward_backward(lambda **a: sigmoid_attn_func(**a, deterministic=True), args, dout)
        second = forward_backward(lambda **a: sigmoid_attn_func(**a, deterministic=True), args, dout)
    assert torch.equal(first[0], second[0])
    for n in first[1]:
        assert torch.equal(first[1][n], second[1][n])


def test_no_grad_forward_and_partial_grads():
    """Only the inputs that require grad get one; under no_grad nothing is recorded."""
    args = Case(1, 17, 33, 2, 1, 16, causal=True, bias="tensor").inputs()
    args["k"].requires_grad_()
    with sigattn.use_backend("torch"):
        with torch.no_grad():
            assert not sigmoid_attn_func(**args).requires_grad
        out = sigmoid_attn_func(**args)
    out.sum().backward()
    assert args["q"].grad is None and args["v"].grad is None and args["bias"].grad is None
    ref_k = args["k"].detach().requires_grad_()
    sigmoid_attn_reference(**{**args, "k": ref_k}).sum().backward()
    torch.testing.assert_close(args["k"].grad, ref_k.grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("block", [16, None], ids=["block16", "default_block"])
def test_rows_without_keys_are_exactly_zero(block):
    """Sq = 113 > Sk = 17, causal: rows 0..95 see no key and output exactly 0, with zero gradients."""
    args = Case(2, 113, 17, 4, 1, 16, causal=True).inputs(torch.float32, requires_grad=True)
    out = blocked_fn(**args, block=block)
    assert torch.equal(out[:, :96], torch.zeros_like(out[:, :96]))
    assert (out[:, 96:].abs().sum(-1) > 0).all()
    out.backward(torch.randn_like(out))
    assert torch.equal(args["q"].grad[:, :96], torch.zeros_like(args["q"].grad[:, :96]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_ambient_autocast_changes_nothing(dtype):
    """Under torch.autocast the backend computes as without it (the kernels are untouched by it too): bf16
    inputs in float32, float32 ones in float32, the same bits, gradients included."""
    case = CASES[4]
    args = case.inputs(dtype=dtype, requires_grad=True)
    dout = torch.randn(*args["q"].shape, dtype=dtype)
    with sigattn.use_backend("torch"):
        expected = forward_backward(lambda **a: sigmoid_attn_func(**a), args, dout)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = forward_backward(lambda **a: sigmoid_attn_func(**a), args, dout)
    assert torch.equal(got[0], expected[0]) and got[0].dtype == dtype
    assert all(torch.equal(got[1][n], g) for n, g in expected[1].items())
