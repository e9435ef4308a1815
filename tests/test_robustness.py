"""Regression tests for the defects a fuzzing pass found (issue 24), each on every backend that serves it.

* strided or expanded auxiliary tensors (a per-head bias, ALiBi slopes, cu_seqlens, cache_seqlens,
  block_table, attn_mask) give exactly the result of contiguous copies;
* window bounds at the integer limits are unbounded, not overflowed, and a max_seqlen there launches no
  more programs than the packed tensors have tokens;
* a rejected KV-cache call leaves the cache bit-identical;
* values that no query may look at (cache slots past a row's length, unused pages, keys past a packed
  sequence's end, keys every query masks, dO rows of queries with no key) never reach an output or
  gradient, and an inf in a query reaches no other row;
* scale, bias and ALiBi slopes that are not finite (or a scale <= 0) are rejected;
* varlen with no sequence stays connected to autograd, and a call with no query head gives an empty output.

The Triton backend runs in the interpreter on the CPU (conftest sets TRITON_INTERPRET=1), in half precision.
The property-based suite (tests/test_fuzz.py) covers the same ground at random.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

import sigattn
from sigattn.ops.sigmoid_attn.reference import sigmoid_attn_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (backend, dtype): the PyTorch backends in float32, the kernels in bfloat16.
BACKENDS = [("torch", torch.float32), ("reference", torch.float32), ("triton", torch.bfloat16)]
BACKEND_IDS = [b for b, _ in BACKENDS]


def randn(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_(requires_grad)


def strided(t: torch.Tensor, junk=None) -> torch.Tensor:
    """The values of ``t`` as a non-contiguous view: column 0 of a (..., 2) allocation whose column 1 is junk
    (NaN for floats, a huge index for integers, unless given)."""
    if junk is None:
        junk = float("nan") if t.is_floating_point() else 1 << 30
    pair = torch.stack([t.detach(), torch.full_like(t.detach(), junk)], dim=-1)
    return pair[..., 0].requires_grad_(t.requires_grad) if t.is_floating_point() else pair[..., 0]


def grads_of(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout, allow_unused=True)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN included."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# ------------------------------------------------------------------------------------------------------
# 1. strided auxiliary tensors


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
def test_strided_bias_and_alibi_equal_contiguous(backend, dtype):
    q, k, v = (randn(2, 19, 4, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = (torch.randn(4, device=DEVICE) - 2).to(dtype).requires_grad_()
    slopes = torch.rand(2, 4, device=DEVICE) * 0.3
    cases = {
        "column of a table": (strided(bias), strided(slopes)),
        "transposed": (bias, slopes.t().contiguous().t()),
        "expanded": (bias[:1].detach().expand(4).requires_grad_(), slopes[:1].expand(2, 4)),
    }
    dout = randn(2, 19, 4, 16, dtype=dtype)
    with sigattn.use_backend(backend):
        for name, (b, a) in cases.items():
            outs = []
            for bb, aa in ((b, a), (b.detach().contiguous().requires_grad_(), a.contiguous())):
                out = sigattn.sigmoid_attn_func(q, k, v, bias=bb, alibi_slopes=aa, causal=True)
                outs.append((out, *grads_of(out, (q, k, v, bb), dout)))
            for got, want in zip(*outs, strict=True):
                assert bitwise_equal(got, want), name


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
def test_strided_cu_seqlens_equal_contiguous(backend, dtype):
    lengths = [5, 0, 13]
    cu = torch.tensor([0, 5, 5, 18], dtype=torch.int32, device=DEVICE)
    q, k, v = (randn(18, 4, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = randn(18, 4, 16, dtype=dtype)
    table = torch.stack([cu, cu * 1000 + 7], dim=1)  # two columns of one table
    with sigattn.use_backend(backend):
        results = []
        for cu_q, cu_k in ((table[:, 0], table[:, 0]), (cu, cu)):
            out = sigattn.sigmoid_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths), max(lengths), causal=True)
            results.append((out, *grads_of(out, (q, k, v), dout)))
    for got, want in zip(*results, strict=True):
        assert bitwise_equal(got, want)


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
def test_strided_block_table_and_cache_seqlens_equal_contiguous(backend, dtype):
    batch, page, pages_per_row = 3, 4, 5
    k_cache, v_cache = (randn(batch * pages_per_row + 2, page, 2, 16, dtype=dtype) for _ in range(2))
    block_table = torch.randperm(batch * pages_per_row, device=DEVICE).to(torch.int32).reshape(batch, -1)
    column_major = block_table.t().contiguous().t()
    cache_seqlens = torch.tensor([3, 20, 11], dtype=torch.int32, device=DEVICE)
    q = randn(batch, 2, 4, 16, dtype=dtype)
    with sigattn.use_backend(backend), torch.no_grad():
        want = sigattn.sigmoid_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=block_table, causal=True
        )
        got = sigattn.sigmoid_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=strided(cache_seqlens), block_table=column_major, causal=True
        )
        assert bitwise_equal(got, want)
        # Pools with the page dim innermost, one full page per row: the gathered rows keep that layout (the CPU's
        # products rounded differently at these sizes).
        pools = [randn(batch, 32, 2, 16, dtype=dtype) for _ in range(2)]
        one_page = torch.arange(batch, dtype=torch.int32, device=DEVICE)[:, None]
        want = sigattn.sigmoid_attn_with_kvcache(q[:, :1, :2], *pools, block_table=one_page)
        permuted = (t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for t in pools)
        assert bitwise_equal(sigattn.sigmoid_attn_with_kvcache(q[:, :1, :2], *permuted, block_table=one_page), want)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_strided_attn_mask_equals_contiguous(backend):
    query, key, value = (randn(2, 3, 9, 8, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 9, 9, device=DEVICE) > 0.3
    additive = randn(9, 9, requires_grad=True)
    # Stride 0 along the keys: its gradient too is per element, as a contiguous mask's.
    expanded = randn(9, 1).expand(9, 9).requires_grad_()
    with sigattn.use_backend(backend):
        for m, view in ((mask, strided(mask, junk=0)), (additive, strided(additive, junk=0)), (expanded, expanded)):
            outs = []
            for mm in (view, m.detach().contiguous().requires_grad_(m.requires_grad)):
                out = sigattn.scaled_dot_product_sigmoid_attention(query, key, value, attn_mask=mm)
                inputs = (query, key, value) + ((mm,) if mm.requires_grad else ())
                outs.append((out, *grads_of(out, inputs, torch.ones_like(out))))
            for got, want in zip(*outs, strict=True):
                assert bitwise_equal(got, want)


# ------------------------------------------------------------------------------------------------------
# 2. window bounds at the integer limits


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize(
    "window", [(sys.maxsize, sys.maxsize), (-1, sys.maxsize), (2**31 - 1, 2**31 - 1), (2**31, 2**63 - 1), (9, 9)]
)
def test_window_bounds_past_the_sequence_are_unbounded(backend, dtype, window):
    q = randn(1, 7, 2, 16, dtype=dtype)
    k, v = (randn(1, 9, 2, 16, dtype=dtype) for _ in range(2))
    with sigattn.use_backend(backend), torch.no_grad():
        assert bitwise_equal(sigattn.sigmoid_attn_func(q, k, v, window_size=window), sigattn.sigmoid_attn_func(q, k, v))
        causal = sigattn.sigmoid_attn_func(q, k, v, causal=True)
        assert bitwise_equal(sigattn.sigmoid_attn_func(q, k, v, window_size=(window[0], 0)), causal)
        cu = torch.tensor([0, 7], dtype=torch.int32, device=DEVICE)
        cu_k = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)
        packed = sigattn.sigmoid_attn_varlen_func(q[0], k[0], v[0], cu, cu_k, 7, 9, window_size=window)
        assert bitwise_equal(packed, sigattn.sigmoid_attn_varlen_func(q[0], k[0], v[0], cu, cu_k, 7, 9))


@pytest.mark.parametrize("max_seqlen", [2**31 - 1, sys.maxsize])
def test_max_seqlen_past_the_packed_tensors_launches_no_more_programs(monkeypatch, max_seqlen):
    """max_seqlen only sizes the kernels' grids: one at the integer limits reaches them as the packed
    tensors' lengths (before, an interpreted launch of 2^27 or more idle programs never finished)."""
    from sigattn.ops.sigmoid_attn import kernels

    seen, forward = [], kernels.forward

    def spy(q, k, v, params, bias, alibi, rows):
        seen.append((rows.seqlen_q, rows.seqlen_k))
        assert rows.seqlen_q <= 7 and rows.seqlen_k <= 9, f"max_seqlen {max_seqlen} reached the kernels"
        return forward(q, k, v, params, bias, alibi, rows)

    monkeypatch.setattr(kernels, "forward", spy)
    q = randn(7, 2, 16, dtype=torch.bfloat16)
    k, v = (randn(9, 2, 16, dtype=torch.bfloat16) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, 2, n], dtype=torch.int32, device=DEVICE) for n in (7, 9))
    with sigattn.use_backend("triton"), torch.no_grad():
        out = sigattn.sigmoid_attn_varlen_func(q, k, v, cu_q, cu_k, max_seqlen, max_seqlen)
        assert bitwise_equal(out, sigattn.sigmoid_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 7))
    assert seen == [(7, 9), (5, 7)]


# ------------------------------------------------------------------------------------------------------
# 3. a rejected KV-cache call changes nothing


def _cache_call(head_dim=16, q_requires_grad=False, **options):
    """A KV-cache call appending 3 tokens to a bfloat16 cache, with ``options`` as keyword arguments."""
    k_cache, v_cache, k, v = (randn(2, n, 2, head_dim, dtype=torch.bfloat16) for n in (12, 12, 3, 3))
    q = randn(2, 3, 4, head_dim, dtype=torch.bfloat16, requires_grad=q_requires_grad)
    lengths = torch.tensor([2, 5], dtype=torch.int32, device=DEVICE)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=lengths, **options)


@pytest.mark.parametrize(
    "call,backend",
    [
        (dict(scale=float("nan")), "auto"),
        (dict(scale=0.0), "auto"),
        (dict(bias=float("inf")), "auto"),
        (dict(window_size=(-2, 0)), "auto"),
        (dict(alibi_slopes=torch.ones(3, device=DEVICE)), "auto"),
        (dict(head_dim=300), "triton"),  # the kernels take D <= 256
        (dict(q_requires_grad=True), "triton"),  # the KV-cache kernel is for inference
    ],
    ids=["scale-nan", "scale-0", "bias-inf", "window", "alibi-shape", "triton-headdim", "triton-q-grad"],
)
def test_rejected_kvcache_call_leaves_the_cache_bit_identical(call, backend):
    args = _cache_call(**call)
    before = (args["k_cache"].clone(), args["v_cache"].clone())
    with sigattn.use_backend(backend), pytest.raises((ValueError, TypeError)):
        sigattn.sigmoid_attn_with_kvcache(**args)
    assert bitwise_equal(args["k_cache"], before[0]) and bitwise_equal(args["v_cache"], before[1])


def test_expanded_cache_is_rejected_before_anything_is_written():
    args = _cache_call()
    args["v_cache"] = args["v_cache"][:, :1].expand(2, 12, 2, 16)
    before = args["k_cache"].clone()
    with pytest.raises(ValueError, match="v_cache must own its memory"):
        sigattn.sigmoid_attn_with_kvcache(**args)
    assert bitwise_equal(args["k_cache"], before)


# ------------------------------------------------------------------------------------------------------
# 4. what no query may look at never reaches an output or a gradient


def _finite_and_equal(poisoned, clean):
    for got, want in zip(poisoned, clean, strict=True):
        assert torch.isfinite(got).all()
        assert bitwise_equal(got, want)


def _dense_case(backend, dtype, poison, **options):
    """Runs sigmoid_attn_func (or with ``sdpa`` the SDPA-style function) on clean inputs and on inputs where
    ``poison(q, k, v, dout)`` wrote NaN and inf where no query may look; both must agree bit for bit."""
    sdpa = options.pop("sdpa", False)
    shape_q, shape_k = options.pop("shapes")
    clean = [
        randn(*shape_q, dtype=dtype),
        randn(*shape_k, dtype=dtype),
        randn(*shape_k, dtype=dtype),
        randn(*shape_q, dtype=dtype),
    ]
    dirty = [t.clone() for t in clean]
    poison(*dirty)
    results = []
    with sigattn.use_backend(backend):
        for q, k, v, dout in (dirty, clean):
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            if sdpa:
                out = sigattn.scaled_dot_product_sigmoid_attention(q, k, v, **options)
            else:
                out = sigattn.sigmoid_attn_func(q, k, v, **options)
            results.append((out, *grads_of(out, (q, k, v), dout)))
    _finite_and_equal(*results)


def _nan_inf(t):
    t[..., 0] = float("nan")
    t[..., -1] = float("inf")


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
def test_keys_outside_every_window_never_reach_anything(backend, dtype):
    # Sq = 20, Sk = 40, window (3, 2), bottom-right: query i sees keys i + 20 - 3 .. i + 22, so keys 0..16 and
    # none past 41 are seen; keys 0..16 hold NaN and inf.
    def poison(q, k, v, dout):
        _nan_inf(k[:, :17])
        _nan_inf(v[:, :17])

    _dense_case(backend, dtype, poison, shapes=((1, 20, 2, 16), (1, 40, 2, 16)), window_size=(3, 2))


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
def test_keys_past_the_queries_of_a_top_left_causal_mask_never_reach_anything(backend, dtype):
    # SDPA's is_causal with Sq = 9 < Sk = 30: keys 9.. are never seen.
    def poison(q, k, v, dout):
        _nan_inf(k[:, :, 9:])
        _nan_inf(v[:, :, 9:])

    _dense_case(backend, dtype, poison, shapes=((1, 2, 9, 16), (1, 2, 30, 16)), sdpa=True, is_causal=True)


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
def test_queries_with_no_key_pass_nothing_on(backend, dtype):
    # Bottom-right causal, Sq = 30 > Sk = 11: queries 0..18 see no key; their q and dO hold NaN and inf.
    def poison(q, k, v, dout):
        _nan_inf(q[:, :19])
        _nan_inf(dout[:, :19])

    _dense_case(backend, dtype, poison, shapes=((1, 30, 2, 16), (1, 11, 2, 16)), causal=True)


@pytest.mark.parametrize("sdpa", [False, True], ids=["window", "top-left-causal"])
def test_unseen_keys_never_reach_anything_through_tma(monkeypatch, sdpa):
    """The Triton forward's TMA loads (forced on these short rows; D = 32 has no padded columns) cover only the
    keys some query sees: the others load as zeros."""
    from sigattn.ops.sigmoid_attn import triton_host

    monkeypatch.setattr(triton_host, "TMA_MIN_KEYS", 1)
    made, descriptor = [], triton_host.TensorDescriptor
    monkeypatch.setattr(triton_host, "TensorDescriptor", lambda *args: made.append(args) or descriptor(*args))

    def poison(q, k, v, dout):
        unseen = (slice(None), slice(None), slice(20, None)) if sdpa else (slice(None), slice(0, 17))
        _nan_inf(k[unseen])
        _nan_inf(v[unseen])

    shapes = ((1, 2, 20, 32), (1, 2, 40, 32)) if sdpa else ((1, 20, 2, 32), (1, 40, 2, 32))
    options = dict(is_causal=True) if sdpa else dict(window_size=(3, 2))
    _dense_case("triton", torch.bfloat16, poison, shapes=shapes, sdpa=sdpa, **options)
    assert made


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_keys_a_mask_hides_from_every_query_never_reach_anything(backend):
    mask = torch.rand(1, 2, 13, 21, device=DEVICE) > 0.4
    mask[..., 5] = False  # key 5: masked for every query (bool), key 8 by -inf
    additive = torch.zeros(1, 2, 13, 21, device=DEVICE)
    additive[..., 8] = -math.inf

    def poison(q, k, v, dout):
        for t in (k, v):
            _nan_inf(t[:, :, 5:6])

    def poison_additive(q, k, v, dout):
        for t in (k, v):
            _nan_inf(t[:, :, 8:9])

    shapes = ((1, 2, 13, 16), (1, 2, 21, 16))
    _dense_case(backend, torch.float32, poison, shapes=shapes, sdpa=True, attn_mask=mask)
    _dense_case(backend, torch.float32, poison_additive, shapes=shapes, sdpa=True, attn_mask=additive)


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
def test_a_packed_sequence_never_reaches_its_neighbours(backend, dtype):
    lengths = [7, 21, 5]
    cu = torch.tensor([0, 7, 28, 33], dtype=torch.int32, device=DEVICE)
    clean = [randn(33, 4, 16, dtype=dtype) for _ in range(4)]  # q, k, v, dout
    dirty = [t.clone() for t in clean]
    for t in dirty:  # the middle sequence is all NaN and inf
        t[7:28] = float("nan")
        t[7:28, :, 3] = float("inf")
    results = []
    with sigattn.use_backend(backend):
        for q, k, v, dout in (dirty, clean):
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            out = sigattn.sigmoid_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
            others = torch.cat([torch.arange(0, 7), torch.arange(28, 33)]).to(DEVICE)
            results.append([t[others] for t in (out, *grads_of(out, (q, k, v), dout))])
    _finite_and_equal(*results)


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
def test_unused_cache_slots_and_pages_never_reach_the_output(backend, dtype):
    page, batch = 4, 2
    k_cache, v_cache = (randn(7, page, 2, 16, dtype=dtype) for _ in range(2))
    block_table = torch.tensor([[5, 1, 3], [0, 2, -1]], dtype=torch.int32, device=DEVICE)
    lengths = torch.tensor([9, 6], dtype=torch.int32, device=DEVICE)
    q = randn(batch, 3, 4, 16, dtype=dtype)
    outs = []
    with sigattn.use_backend(backend), torch.no_grad():
        for poisoned in (True, False):
            kc, vc = k_cache.clone(), v_cache.clone()
            if poisoned:
                for c in (kc, vc):
                    c[[4, 6]] = float("nan")  # pages no row uses
                    c[3, 1:] = float("inf")  # row 0's positions 9..11
                    c[2, 2:] = float("nan")  # row 1's positions 6..7
            outs.append(
                sigattn.sigmoid_attn_with_kvcache(
                    q, kc, vc, cache_seqlens=lengths, block_table=block_table, causal=True
                )
            )
    assert torch.isfinite(outs[0]).all() and bitwise_equal(*outs)


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
def test_an_inf_in_a_query_reaches_only_its_own_row(backend, dtype):
    # Odd lengths, so the kernels' last tiles hold zero padding rows (inf x 0 would be NaN there).
    q, k, v, dout = (randn(1, n, 2, 16, dtype=dtype) for n in (13, 21, 21, 13))
    q[0, 4, 1, 0] = float("inf")
    k[0, :, 1, 0] = torch.rand(21, device=DEVICE).to(dtype) + 0.5  # every score of that query is +inf
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with sigattn.use_backend(backend):
        out = sigattn.sigmoid_attn_func(q, k, v)
        dq, dk, dv = grads_of(out, (q, k, v), dout)
    truth = sigmoid_attn_reference(q.detach().double(), k.detach().double(), v.detach().double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 4, 1].double(), truth[0, 4, 1], atol=0.05, rtol=0.02)
    assert torch.isfinite(dv).all()
    assert torch.isfinite(dq).all()
    # dK of head 1 is inf x 0 in column 0 for every key (the math says so); other columns and heads finite.
    assert torch.isfinite(dk[:, :, 0]).all() and torch.isfinite(dk[:, :, 1, 1:]).all()


# ------------------------------------------------------------------------------------------------------
# 7. arguments that are not finite, and a scale <= 0


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(scale=float("nan")), "scale"),
        (dict(scale=float("inf")), "scale"),
        (dict(scale=-float("inf")), "scale"),
        (dict(scale=0), "scale"),
        (dict(scale=-0.1), "scale"),
        (dict(bias=float("nan")), "bias"),
        (dict(bias=-float("inf")), "bias"),
        (dict(bias=torch.tensor([0.0, float("nan")])), "bias"),
        (dict(alibi_slopes=torch.tensor([0.1, float("nan")])), "alibi_slopes"),
    ],
    ids=lambda x: repr(x) if isinstance(x, str) else None,
)
def test_non_finite_options_are_rejected(options, match):
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    options = {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in options.items()}
    with pytest.raises(ValueError, match=match):
        sigattn.sigmoid_attn_func(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), **options)


# ------------------------------------------------------------------------------------------------------
# 8. varlen with no sequence


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
def test_varlen_with_no_sequence_is_connected_to_autograd(backend, dtype):
    q, k, v = (randn(0, 4, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with sigattn.use_backend(backend):
        out = sigattn.sigmoid_attn_varlen_func(q, k, v, cu, cu, 0, 0)
        out.sum().backward()
    assert out.shape == (0, 4, 16) and all(t.grad is not None and t.grad.shape == t.shape for t in (q, k, v))


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("options", ["bias", "alibi"])
def test_no_query_head_gives_an_empty_output(backend, dtype, options):
    """Hq = 0 (a multiple of Hkv = 1), with a (0,) bias or (B, 0) ALiBi slopes: an empty output, zero gradients."""
    q = randn(2, 3, 0, 16, dtype=dtype, requires_grad=True)
    k, v = (randn(2, 5, 1, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    bias = randn(0, requires_grad=True) if options == "bias" else None
    alibi = randn(2, 0) if options == "alibi" else None
    with sigattn.use_backend(backend):
        out = sigattn.sigmoid_attn_func(q, k, v, bias=bias, alibi_slopes=alibi, causal=True)
        out.float().sum().backward()
    assert out.shape == (2, 3, 0, 16) and all((t.grad == 0).all() for t in (k, v))


# ------------------------------------------------------------------------------------------------------
# 5. torch.compile(fullgraph=True, dynamic=True) of the torch backend


def test_every_function_compiles_with_fullgraph_and_dynamic_shapes():
    """On the torch backend (the CPU's), one compiled function calls all four public functions (with masks
    that make the blocked path read values); its outputs, gradients and cache match the eager calls."""
    torch._dynamo.reset()
    alibi = torch.rand(2, 4, device=DEVICE) * 0.2
    bool_mask = torch.rand(2, 1, 13, 13, device=DEVICE) > 0.3
    cu = torch.tensor([0, 4, 4, 13], dtype=torch.int32, device=DEVICE)
    lengths = torch.tensor([3, 7], dtype=torch.int32, device=DEVICE)

    def every_function(q, k, v, k_cache, v_cache):
        dense = sigattn.sigmoid_attn_func(q, k, v, causal=True, window_size=(5, -1), alibi_slopes=alibi)
        sdpa = sigattn.scaled_dot_product_sigmoid_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bool_mask, enable_gqa=True
        )
        packed = sigattn.sigmoid_attn_varlen_func(q[0], k[0], v[0], cu, cu, 9, 9, causal=True)
        new = [t[:, :2].detach() for t in (q, k, v)]
        with torch.no_grad():
            cached = sigattn.sigmoid_attn_with_kvcache(
                new[0], k_cache, v_cache, *new[1:], cache_seqlens=lengths, causal=True
            )
        return dense.sum() + sdpa.sum() + packed.sum(), cached

    q = randn(2, 13, 4, 8, requires_grad=True)
    k, v = (randn(2, 13, 2, 8, requires_grad=True) for _ in range(2))
    caches = [randn(2, 16, 2, 8) for _ in range(2)]
    results = []
    with sigattn.use_backend("torch"):
        for fn in (torch.compile(every_function, fullgraph=True, dynamic=True), every_function):
            fresh = [c.clone() for c in caches]
            total, cached = fn(q, k, v, *fresh)
            results.append((total, cached, *fresh, *torch.autograd.grad(total, (q, k, v))))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_rows", [False, True], ids=["H", "BH"])
def test_alibi_slopes_of_a_module_buffer_trace_with_dynamic_shapes(batch_rows):
    """A module's buffers keep static shapes under dynamic=True while q's are symbolic: the slopes' shape
    check still sees (Hq,) or (B, Hq)."""
    torch._dynamo.reset()

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("slopes", torch.rand(*((2,) if batch_rows else ()), 4, device=DEVICE) * 0.2)

        def forward(self, q, k, v):
            return sigattn.sigmoid_attn_func(q, k, v, causal=True, alibi_slopes=self.slopes)

    module = Attention()
    q, k, v = (randn(2, 7, 4, 8) for _ in range(3))
    with sigattn.use_backend("torch"):
        compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="eager")
        torch.testing.assert_close(compiled(q, k, v), module(q, k, v), atol=1e-6, rtol=1e-6)
