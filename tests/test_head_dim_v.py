"""A value head dim of its own: q and k with D, v (and the output) with Dv, as FlashAttention 3 and cuDNN allow
(DeepSeek's MLA trains with 192/128).

Every public function on every backend against the float64 reference, forward and every gradient, by the
tolerance rule (the kernels' own accuracy at these shapes, outputs poisoned, is ``test_flash.py``'s grid
cases with ``head_dim_v``); torch.compile's view of the output (the custom ops' fake shapes); what declines
and what is refused, by name.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_within_backend_rule, forward_backward

import sigattn
from sigattn.backends import AttnCall, explain, use_backend
from sigattn.ops.sigmoid_attn import host
from sigattn.ops.sigmoid_attn.reference import Mask, sigmoid_attn_reference

BACKENDS = ["reference", "torch", "triton"]
# (D, Dv): narrower and wider values than queries, padded in the kernels (48 -> 64, 20 -> 32) or not
DIMS = [(48, 20), (16, 64)]


def _dtype(backend: str) -> torch.dtype:
    return torch.bfloat16 if backend == "triton" else torch.float32


def _randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check(ours, reference, args: dict, dout, dtype, backend):
    """ours(**args) against reference(upcast)(**args), output and every gradient, by ``assert_within_backend_rule``."""
    got, got_grads = forward_backward(ours, args, dout)
    leaves = {n: t.detach().double().requires_grad_(t.requires_grad) for n, t in args.items()}
    truth, truth_grads = forward_backward(reference(True), leaves, dout)
    base = {n: t.detach().clone().requires_grad_(t.requires_grad) for n, t in args.items()}
    baseline, base_grads = forward_backward(reference(False), base, dout)
    assert_within_backend_rule("out", got, truth, baseline, dtype, backend)
    assert set(got_grads) == set(truth_grads)
    for name, grad in got_grads.items():
        assert_within_backend_rule(f"d{name}", grad, truth_grads[name], base_grads[name], dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"D{d[0]}-Dv{d[1]}")
@pytest.mark.parametrize("options", ["causal-headbias", "window-alibi"])
def test_dense_against_the_reference(backend, dims, options):
    d, dv = dims
    dtype = _dtype(backend)
    tensors = dict(q=_randn(2, 37, 4, d, seed=0), k=_randn(2, 29, 2, d, seed=1), v=_randn(2, 29, 2, dv, seed=2))
    args = {n: t.to(dtype).requires_grad_() for n, t in tensors.items()}
    if options == "causal-headbias":
        options = dict(causal=True)
        args["bias"] = torch.tensor([-1.0, -2.0, -0.5, -3.0]).requires_grad_()
    else:
        options = dict(window_size=(9, 3), alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]), bias=-1.5)
    dout = _randn(2, 37, 4, dv, seed=3).to(dtype)

    def ours(**a):
        with use_backend(backend):
            out = sigattn.sigmoid_attn_func(**a, **options)
        assert out.shape == (2, 37, 4, dv)
        return out

    def reference(upcast):
        return lambda **a: sigmoid_attn_reference(**a, **options, upcast=upcast)

    _check(ours, reference, args, dout, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_is_each_sequence_alone(backend):
    """Packed sequences with Dv != D: each sequence's rows equal the dense call on it alone (float64 truth),
    forward and gradients, by the tolerance rule."""
    dtype = _dtype(backend)
    lens_q, lens_k = (5, 0, 23, 17), (7, 3, 19, 17)
    q = _randn(sum(lens_q), 4, 32, seed=3).to(dtype).requires_grad_()
    k = _randn(sum(lens_k), 2, 32, seed=4).to(dtype).requires_grad_()
    v = _randn(sum(lens_k), 2, 16, seed=5).to(dtype).requires_grad_()
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    dout = _randn(sum(lens_q), 4, 16, seed=6).to(dtype)

    def ours(q, k, v):
        with use_backend(backend):
            return sigattn.sigmoid_attn_varlen_func(
                q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, bias=-1.0
            )

    def per_sequence(upcast):
        def run(q, k, v):
            outs = []
            for i in range(len(lens_q)):
                rows, cols = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
                part = sigmoid_attn_reference(
                    q[None, rows], k[None, cols], v[None, cols], causal=True, bias=-1.0, upcast=upcast
                )
                outs.append(part[0])
            return torch.cat(outs)

        return run

    _check(ours, per_sequence, dict(q=q, k=k, v=v), dout, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_appends_and_attends(backend, paged):
    """Appended k and v (each with its head dim) land in their caches, and the output is the dense call on
    each row's keys, by the tolerance rule."""
    dtype = _dtype(backend)
    batch, heads, kv_heads, d, dv, page = 2, 4, 2, 32, 48, 16
    lengths, new = torch.tensor([5, 30], dtype=torch.int32), 3
    slots = (batch * 3, page) if paged else (batch, 3 * page)
    k_cache = _randn(*slots, kv_heads, d, seed=7).to(dtype)
    v_cache = _randn(*slots, kv_heads, dv, seed=8).to(dtype)
    table = torch.arange(batch * 3, dtype=torch.int32).flip(0).reshape(batch, 3) if paged else None
    q, k = _randn(batch, new, heads, d, seed=9).to(dtype), _randn(batch, new, kv_heads, d, seed=10).to(dtype)
    v = _randn(batch, new, kv_heads, dv, seed=11).to(dtype)
    with use_backend(backend):
        out = sigattn.sigmoid_attn_with_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens=lengths, block_table=table, causal=True, bias=-1.0
        )
    assert out.shape == (batch, new, heads, dv)

    def row_keys(cache, b):
        rows = cache[table[b].long()].flatten(0, 1) if paged else cache[b]
        return rows[: lengths[b] + new]

    for b in range(batch):
        keys, values = row_keys(k_cache, b), row_keys(v_cache, b)
        torch.testing.assert_close(keys[lengths[b] :], k[b])  # appended in place
        torch.testing.assert_close(values[lengths[b] :], v[b])
        args = (q[b : b + 1], keys[None], values[None])
        truth = sigmoid_attn_reference(*(t.double() for t in args), causal=True, bias=-1.0)
        baseline = sigmoid_attn_reference(*args, causal=True, bias=-1.0, upcast=False)
        assert_within_backend_rule(f"row {b}", out[b : b + 1], truth, baseline, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_layout(backend):
    """scaled_dot_product_sigmoid_attention with SDPA's Ev != E: (B, H, Sq, Ev), the flash-layout call
    transposed."""
    dtype = _dtype(backend)
    q, k, v = _randn(2, 4, 21, 32, seed=12), _randn(2, 2, 19, 32, seed=13), _randn(2, 2, 19, 8, seed=14)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    with use_backend(backend):
        got = sigattn.scaled_dot_product_sigmoid_attention(q, k, v, is_causal=True, enable_gqa=True)
        flash = sigattn.sigmoid_attn_func(
            *(t.transpose(1, 2) for t in (q, k, v)), causal=True, bias=-math.log(19), window_size=(-1, -1)
        )
    assert got.shape == (2, 4, 21, 8)
    # SDPA's causal mask is top-left aligned; Sq > Sk here, so compare with the reference directly.
    args = [t.transpose(1, 2) for t in (q, k, v)]
    truth = sigmoid_attn_reference(*(t.double() for t in args), causal=True, top_left=True, bias=-math.log(19))
    baseline = sigmoid_attn_reference(*args, causal=True, top_left=True, bias=-math.log(19), upcast=False)
    assert_within_backend_rule("out", got.transpose(1, 2), truth, baseline, dtype, backend)
    assert flash.shape == (2, 21, 4, 8)


def test_compiled_call_has_the_value_head_dim():
    """Under torch.compile (fullgraph, the custom ops' fake implementations) the output and dV take v's head
    dim, dQ and dK q's."""
    q = torch.randn(1, 16, 2, 32, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 16, 2, 32, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 16, 2, 16, dtype=torch.bfloat16, requires_grad=True)

    def call(q, k, v):
        return sigattn.sigmoid_attn_func(q, k, v, causal=True, bias=-1.0)

    with use_backend("triton"):
        eager = call(q, k, v)
        compiled = torch.compile(call, backend="aot_eager", fullgraph=True)(q, k, v)
        compiled.float().sum().backward()
    assert compiled.shape == eager.shape == (1, 16, 2, 16)
    torch.testing.assert_close(compiled, eager)
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_the_fast_kernels_decline_and_the_triton_backend_names_its_limit():
    q = torch.randn(1, 8, 2, 128, dtype=torch.bfloat16)
    k, v = torch.randn(1, 8, 2, 128, dtype=torch.bfloat16), torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    assert host.unsupported_common(q, k, v, (q, k, v)) == "value head dim 64 differs from the query's 128"
    assert host.unsupported_common(q, k, k, (q, k, k)) is None
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    call = AttnCall("dense", q, q, torch.randn(1, 8, 2, 320, dtype=torch.bfloat16), 0.125, -1.0, Mask(), None, False)
    assert "head dim 64 (v: 320) (at most 256)" in explain(call)["why_not"]["triton"]


@pytest.mark.parametrize(
    "call, pattern",
    [
        (
            lambda t: sigattn.sigmoid_attn_func(t(1, 4, 2, 8), t(1, 4, 2, 8), t(1, 5, 2, 6)),
            r"k and v must have the same shape \(B, Sk, Hkv, D\|Dv\) but the head dim .*\(1, 4, 2, 8\) and "
            r"\(1, 5, 2, 6\)",
        ),
        (
            lambda t: sigattn.sigmoid_attn_func(t(1, 4, 2, 8), t(1, 4, 2, 8), t(1, 4, 2, 0)),
            r"head dim must be at least 1, got v of shape \(1, 4, 2, 0\)",
        ),
        (
            lambda t: sigattn.sigmoid_attn_func(t(1, 4, 2, 8), t(1, 4, 2, 6), t(1, 4, 2, 6)),
            r"k must have the head dim of q \(8\), got 6",
        ),
        (
            lambda t: sigattn.sigmoid_attn_with_kvcache(
                t(1, 1, 2, 8), t(1, 9, 2, 8), t(1, 9, 2, 4), t(1, 1, 2, 8), t(1, 1, 2, 8), cache_seqlens=3
            ),
            r"v must have shape \(B, seqlen_new, Hkv, Dv\) = \(1, \*, 2, 4\), got \(1, 1, 2, 8\)",
        ),
        (
            lambda t: sigattn.sigmoid_attn_with_kvcache(
                t(1, 1, 2, 8), t(1, 9, 2, 8), t(1, 9, 2, 4), t(1, 1, 2, 8), t(1, 2, 2, 4), cache_seqlens=3
            ),
            r"k and v must have the same length \(dim 1\), got \(1, 1, 2, 8\) and \(1, 2, 2, 4\)",
        ),
    ],
    ids=["kv-length", "v-empty-head-dim", "k-head-dim", "kvcache-new-v-head-dim", "kvcache-new-lengths"],
)
def test_bad_shapes_are_refused_by_name(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(lambda *shape: torch.randn(shape))
