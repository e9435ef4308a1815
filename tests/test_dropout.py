"""Attention dropout (``sigattn/ops/sigmoid_attn/dropout.py``): one draw on every backend and in the kernels.

The mask a call applies is ``dropout.keep_mask`` of its seed (the debug entry point): the Triton kernels (in
the interpreter), the blocked and compiled PyTorch paths and the reference are each compared, output and every
gradient, with the float64 reference applying that mask, by the tolerance rule. The draw itself is checked
word for word against Triton's ``tl.philox`` (and the kernels' tile of kept weights against ``keep_mask``)
and for its statistics (rate, independence of rows, heads, keys
and seeds); ``torch.manual_seed`` reproduces a call, and a seed's mask does not depend on tiles.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import assert_within_backend_rule, forward_backward

import sigattn
from sigattn.backends import use_backend
from sigattn.ops.sigmoid_attn import hopper, hopper_bwd, kernels, triton_kernels
from sigattn.ops.sigmoid_attn.dropout import Dropout, draw_seed, draws, keep_mask, philox, threshold
from sigattn.ops.sigmoid_attn.params import Params, Rows
from sigattn.ops.sigmoid_attn.reference import (
    Mask,
    sigmoid_attn_reference,
    sigmoid_attn_varlen_reference,
)
from sigattn.ops.sigmoid_attn.traceable import sigmoid_attn_varlen_traceable


@triton.jit
def _philox_words(Seed, Out, bh, ROWS: tl.constexpr, COLS: tl.constexpr):
    i = tl.arange(0, ROWS)[:, None]
    j = tl.arange(0, COLS)[None, :]
    zero = i * 0 + j * 0
    words = tl.philox(tl.load(Seed), j + zero, i + zero, bh + zero, zero)
    for w in tl.static_range(4):
        tl.store(Out + w * ROWS * COLS + i * COLS + j, words[w].to(tl.int32, bitcast=True))


@triton.jit
def _kept_tile(Seed, Out, bh, n0, threshold, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TRANSPOSED: tl.constexpr):
    i = tl.arange(0, ROWS)[:, None]
    kept = triton_kernels._kept(tl.load(Seed), bh, i, n0, threshold, BLOCK_N)
    if TRANSPOSED:  # as the dK/dV kernel takes it: keys along rows
        tl.store(Out + tl.arange(0, BLOCK_N)[:, None] * ROWS + tl.arange(0, ROWS)[None, :], tl.trans(kept))
    else:
        tl.store(Out + i * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], kept)


@pytest.mark.parametrize("seed", [0, 1, 12345, (1 << 62) - 7, 0xDEADBEEFCAFE])
def test_philox_matches_tritons_word_for_word(seed):
    """The PyTorch draw is Triton's: the same four 32-bit words for every counter of a tile."""
    seeds = torch.tensor([seed], dtype=torch.int64)
    words = torch.empty(4, 16, 32, dtype=torch.int32)
    _philox_words[(1,)](seeds, words, 77, 16, 32)
    ours = philox(seeds, torch.arange(32)[None, :], torch.arange(16)[:, None], torch.tensor(77), torch.tensor(0))
    for w in range(4):
        assert torch.equal(words[w].long() & 0xFFFFFFFF, ours[w])


@pytest.mark.parametrize("transposed", [False, True], ids=["queries-on-rows", "keys-on-rows"])
@pytest.mark.parametrize("block_n, n0", [(16, 0), (32, 48), (64, 8 * 1001)])
def test_kernels_keep_what_keep_mask_keeps(block_n, n0, transposed):
    """The kernels' tile of kept weights (eight draws per Philox call, folded into the keys' axis, in either
    orientation) is keep_mask's, at tiles starting anywhere on a multiple of 8."""
    dropout = Dropout(0.37, torch.tensor([4321]))
    rows, bh = 16, 5
    out = torch.empty((block_n, rows) if transposed else (rows, block_n), dtype=torch.int8)
    _kept_tile[(1,)](dropout.seed, out, bh, n0, dropout.threshold, rows, block_n, transposed)
    want = keep_mask(dropout, 1, 6, rows, n0 + block_n, cols=torch.arange(n0, n0 + block_n))[0, bh]
    assert torch.equal(out.bool(), want.T if transposed else want)
    assert 0 < want.float().mean() < 1


def test_philox_known_answer():
    """Philox4x32-10 of Random123's known-answer test (key 0, counter 0): 6627e8d5 e169c58d bc57ac4c 9b00dbd8."""
    zero = torch.tensor(0)
    assert [w.item() for w in philox(0, zero, zero, zero, zero)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_draws_are_the_words_halves_in_order():
    """Key 8c + e draws half e % 2 (low first) of word e // 2 of the call at counter c."""
    seed, i, bh = torch.tensor([7]), torch.tensor(3), torch.tensor(2)
    words = philox(seed, torch.arange(5), i, bh, torch.tensor(0))
    expected = torch.stack([(words[e // 2] >> (16 * (e % 2))) & 0xFFFF for e in range(8)], dim=1).flatten()
    assert torch.equal(draws(seed, bh, i, torch.arange(40)), expected)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_independence(p):
    """Over 2 x 4 x 128 x 128 weights the kept fraction is 1 - p within 5 binomial standard errors, and rows,
    heads, keys and seeds draw independently (the correlation of neighbours' masks is near 0)."""
    dropout = Dropout(p, torch.tensor([2024]))
    keep = keep_mask(dropout, 2, 4, 128, 128).double()
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)
    other = keep_mask(dropout._replace(seed=torch.tensor([2025])), 2, 4, 128, 128).double()

    def correlation(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return (a @ b / (a.norm() * b.norm())).item()

    bound = 5 / math.sqrt(n / 4)
    for a, b in [
        (keep[:, :, 1:], keep[:, :, :-1]),  # neighbouring queries
        (keep[..., 1:], keep[..., :-1]),  # neighbouring keys
        (keep[:, 1:], keep[:, :-1]),  # neighbouring heads
        (keep[1:], keep[:-1]),  # batch rows
        (keep, other),  # seeds
    ]:
        assert abs(correlation(a, b)) < bound


def test_threshold_is_exact_at_the_ends():
    assert threshold(0.0) == 0 and threshold(0.5) == 1 << 15 and threshold(0.999999) == 1 << 16
    values = draws(torch.tensor([5]), torch.tensor(0), torch.tensor(0), torch.arange(4000))
    assert bool(((values >= 0) & (values < (1 << 16))).all())
    assert len(values.unique()) > 3000  # all 16 bits vary: 4000 draws of 2^16 values repeat ~120 times


@pytest.mark.parametrize("p", [1e-6, 2.0**-17])
def test_a_p_below_the_draws_resolution_is_refused(p):
    """A p that rounds to 0 in 2^-16 steps would drop nothing: refused by name, not silently ignored."""
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match=r"dropout_p=.* is below the resolution .* at least 2\^-16"):
        sigattn.sigmoid_attn_func(q, q, q, dropout_p=p)
    sigattn.sigmoid_attn_func(q, q, q, dropout_p=2.0**-16)  # the smallest accepted


def test_a_mask_does_not_depend_on_the_tile():
    """keep_mask of a tile is the tile of the whole mask; a packed sequence's mask is that of its batch row."""
    dropout = Dropout(0.3, torch.tensor([99]))
    whole = keep_mask(dropout, 3, 2, 40, 50)
    tile = keep_mask(dropout, 3, 2, 40, 50, rows=torch.arange(7, 19), cols=torch.arange(30, 50))
    assert torch.equal(tile, whole[:, :, 7:19, 30:50])
    assert torch.equal(keep_mask(dropout._replace(first_batch=2), 1, 2, 40, 50), whole[2:])


def _inputs(batch=2, seqlen_q=37, seqlen_k=29, heads=4, kv_heads=2, head_dim=32, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, heads, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, seqlen_k, kv_heads, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, seqlen_k, kv_heads, head_dim, generator=gen, dtype=torch.float64)
    dout = torch.randn(batch, seqlen_q, heads, head_dim, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], dout.to(dtype)


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


DENSE_OPTIONS = {
    "full": {},
    "causal": {"causal": True},
    "window": {"window_size": (9, 3)},
    "alibi-headbias": {"causal": True, "alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625])},
}


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("options", list(DENSE_OPTIONS), ids=list(DENSE_OPTIONS))
def test_dense_dropout_against_the_reference_with_its_mask(backend, options, monkeypatch):
    """sigmoid_attn_func(dropout_p=0.3) against the float64 reference applying the call's own mask (the seed
    drawn again after the same torch.manual_seed), forward and every gradient, by the tolerance rule; the
    backward drops what the forward dropped, or the gradients would miss by far more."""
    dtype = torch.bfloat16 if backend == "triton" else torch.float32
    (q, k, v), dout = _inputs(dtype=dtype)
    extra = dict(DENSE_OPTIONS[options])
    bias = torch.full((4,), -1.5, dtype=torch.float32) if options == "alibi-headbias" else -1.0
    torch.manual_seed(5)
    seed = draw_seed("cpu")
    dropout = Dropout(0.3, seed)
    leaves = _leaves([q, k, v])
    args = dict(q=leaves[0], k=leaves[1], v=leaves[2])
    if isinstance(bias, torch.Tensor):
        args["bias"] = bias.clone().requires_grad_()

    def ours(**a):
        torch.manual_seed(5)
        with use_backend(backend):
            return sigattn.sigmoid_attn_func(a["q"], a["k"], a["v"], 0.3, bias=a.get("bias", bias), **extra)

    def reference(upcast):
        def run(**a):
            return sigmoid_attn_reference(
                a["q"], a["k"], a["v"], bias=a.get("bias", bias), dropout=dropout, upcast=upcast, **extra
            )

        return run

    got, got_grads = forward_backward(ours, args, dout)
    truth_args = {n: t.detach().double().requires_grad_() for n, t in args.items()}
    truth, truth_grads = forward_backward(reference(True), truth_args, dout)
    base_args = {n: t.detach().clone().requires_grad_() for n, t in args.items()}
    baseline, base_grads = forward_backward(reference(False), base_args, dout)
    assert_within_backend_rule("out", got, truth, baseline, dtype, backend)
    for name, grad in got_grads.items():
        assert_within_backend_rule(f"d{name}", grad, truth_grads[name], base_grads[name], dtype, backend)
    # Not the no-dropout result: the mask did something.
    no_dropout = sigmoid_attn_reference(*(t.double() for t in (q, k, v)), bias=bias, **extra)
    assert (truth - no_dropout).abs().max() > 0.5


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_varlen_dropout_is_each_sequence_as_its_batch_row(backend):
    """Packed sequences draw sequence b's weights as batch row b of a dense call would (so the varlen and
    dense kernels agree on a batch of equal lengths), forward and gradients, against the reference."""
    dtype = torch.bfloat16 if backend == "triton" else torch.float32
    lengths = [13, 1, 30, 0, 22]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(sum(lengths), h, 32, generator=gen).to(dtype) for h in (4, 2, 2))
    dout = torch.randn(sum(lengths), 4, 32, generator=gen).to(dtype)
    torch.manual_seed(8)
    dropout = Dropout(0.25, draw_seed("cpu"))
    leaves = _leaves([q, k, v])
    torch.manual_seed(8)
    with use_backend(backend):
        out = sigattn.sigmoid_attn_varlen_func(*leaves, cu, cu, 30, 30, 0.25, causal=True, bias=-1.0)
    got = torch.autograd.grad(out, leaves, dout)
    truth_leaves = _leaves([q, k, v], torch.float64)
    truth = sigmoid_attn_varlen_reference(*truth_leaves, cu, cu, causal=True, bias=-1.0, dropout=dropout)
    truth_grads = torch.autograd.grad(truth, truth_leaves, dout.double())
    base_leaves = _leaves([q, k, v])
    options = dict(causal=True, bias=-1.0, dropout=dropout, upcast=False)
    baseline = sigmoid_attn_varlen_reference(*base_leaves, cu, cu, **options)
    base_grads = torch.autograd.grad(baseline, base_leaves, dout)
    assert_within_backend_rule("out", out.detach(), truth, baseline.detach(), dtype, backend)
    for name, g, t, b in zip("qkv", got, truth_grads, base_grads, strict=True):
        assert_within_backend_rule(f"d{name}", g, t, b, dtype, backend)


def test_compiled_varlen_path_draws_the_same_mask():
    """The torch backend's traced varlen formulation (one row of all tokens) applies the reference's mask."""
    lengths = [5, 17, 9]
    cu = torch.tensor([0, 5, 22, 31], dtype=torch.int32)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(sum(lengths), h, 16, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    dropout = Dropout(0.4, torch.tensor([77]))
    mask = Mask(causal=True)
    traced = sigmoid_attn_varlen_traceable(
        q, k, v, cu, cu, scale=0.25, bias=-1.0, mask=mask, dropout=dropout, exact=True
    )
    reference = sigmoid_attn_varlen_reference(q, k, v, cu, cu, scale=0.25, bias=-1.0, causal=True, dropout=dropout)
    torch.testing.assert_close(traced, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_with_dropout(backend):
    """Under torch.compile (the torch backend's traceable path; the kernels' custom ops, whose seed is a
    tensor argument) the seed is never read on the host: fullgraph compiles, and the output and gradients
    are the eager ones for the same manual seed."""
    (q, k, v), dout = _inputs(dtype=torch.float32 if backend == "torch" else torch.bfloat16)

    def call(q, k, v):
        return sigattn.sigmoid_attn_func(q, k, v, 0.2, causal=True)

    results = []
    for fn in (call, torch.compile(call, fullgraph=True, backend="eager")):
        leaves = _leaves([q, k, v])
        with use_backend(backend):
            torch.manual_seed(1)
            out = fn(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, dout)))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_manual_seed_reproduces_a_call_and_calls_differ(backend):
    (q, k, v), _ = _inputs()
    if backend == "torch":
        q, k, v = (t.float() for t in (q, k, v))
    with use_backend(backend):
        torch.manual_seed(0)
        first = sigattn.sigmoid_attn_func(q, k, v, 0.5)
        second = sigattn.sigmoid_attn_func(q, k, v, 0.5)
        torch.manual_seed(0)
        again = sigattn.sigmoid_attn_func(q, k, v, 0.5)
        plain = sigattn.sigmoid_attn_func(q, k, v, 0.0)
        no_dropout = sigattn.sigmoid_attn_func(q, k, v)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    assert torch.equal(plain, no_dropout)


def test_zero_dropout_draws_nothing():
    """dropout_p = 0 is the plain call and consumes nothing of the generator (as SDPA in evaluation)."""
    (q, k, v), _ = _inputs(dtype=torch.float32)
    torch.manual_seed(0)
    sigattn.sigmoid_attn_func(q, k, v, 0.0)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)


def test_a_call_that_raises_draws_no_seed():
    (q, k, v), _ = _inputs(dtype=torch.float32)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="window_size"):
        sigattn.sigmoid_attn_func(q, k, v, 0.5, window_size=(-2, 0))
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)


def test_gluon_kernels_decline_dropout(monkeypatch):
    """The Gluon kernels have no dropout: both directions name it, and the Triton kernels run the call."""
    monkeypatch.setattr(kernels, "_sm90_reason", lambda q: None)
    q = torch.empty(2, 600, 4, 128, dtype=torch.bfloat16)
    k = torch.empty(2, 600, 2, 128, dtype=torch.bfloat16)
    v, out, do = torch.empty_like(k), torch.empty_like(q), torch.empty_like(q)
    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(k))
    params = Params(0.1, Mask(causal=True), dropout=Dropout(0.1, torch.tensor([1])))
    rows = Rows.dense(q, k)
    assert hopper.unsupported(q, k, v, out, params, None, rows) == "attention dropout"
    assert hopper_bwd.unsupported(do, q, k, v, grads, params, 0.0, rows) == "attention dropout"
    kernel, declined = kernels.choose(kernels.FORWARD, q, k, v, out, params, 0.0, None, rows)
    assert kernel.name == "triton" and declined == {"gluon-sm90": "attention dropout"}


@pytest.mark.parametrize("attn", ["sigmoid", "softmax"])
def test_attention_module_drops_weights_in_training_only(attn):
    """BlockConfig.attn_dropout reaches the attention (sigmoid_attn_func's or SDPA's dropout_p) in training
    mode; in evaluation the module computes what it does without it."""
    from sigattn.nn.attention import SigmoidAttention
    from sigattn.nn.config import BlockConfig

    torch.manual_seed(0)
    module = SigmoidAttention(BlockConfig(d_model=32, n_head=4, attn=attn, attn_dropout=0.5), 16, causal=True)
    plain = SigmoidAttention(BlockConfig(d_model=32, n_head=4, attn=attn), 16, causal=True)
    plain.load_state_dict(module.state_dict())
    x = torch.randn(2, 16, 32)
    module.eval()
    torch.testing.assert_close(module(x), plain(x), rtol=0, atol=0)
    module.train()
    torch.manual_seed(1)
    first = module(x)
    torch.manual_seed(1)
    assert torch.equal(module(x), first)
    assert not torch.allclose(first, plain(x))
    with pytest.raises(ValueError, match=r"attn_dropout must be in \[0, 1\), got 1\.0"):
        BlockConfig(d_model=32, n_head=4, attn_dropout=1.0)
