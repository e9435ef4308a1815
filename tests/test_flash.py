"""The Triton kernels, run on the CPU through TRITON_INTERPRET=1 (conftest sets it) or on a GPU.

The full grid runs on the GPU with ``python -m sigattn.testing.grid``; here a slice of it forces every kernel
path: unmasked and masked tiles, ragged tiles, padded head dims, GQA/MQA, ALiBi, per-head bias; packed
sequences (an empty one included); KV caches contiguous and paged, with and without GQA packing and key
splits, with NaN in every unused cache slot.
"""

from __future__ import annotations

import math

import pytest
import torch

import sigattn
from sigattn.ops.sigmoid_attn import flash, kernels, triton_host
from sigattn.ops.sigmoid_attn.params import Params, Rows
from sigattn.ops.sigmoid_attn.reference import Mask, resolve_bias, sigmoid_attn_reference
from sigattn.testing.grid import Case, KVCacheCase, VarlenCase, run_case

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
    VarlenCase((5, 0, 40, 17), (7, 3, 33, 17), 4, 2, 32, causal=True, alibi=True),
    VarlenCase((19, 1), (0, 30), 2, 1, 24, dtype="float16", window=(5, 2), head_bias=True),
    KVCacheCase((0, 13, 50), 1, 64, 8, 2, 32, num_splits=1, pack_gqa=False),
    KVCacheCase((0, 13, 50), 1, 64, 8, 2, 32, page_size=16, num_splits=3, pack_gqa=True),
    KVCacheCase((5, 30), 7, 48, 4, 1, 24, dtype="float16", window=(9, -1), alibi=True, head_bias=True),
    KVCacheCase((0, 20), 3, 32, 6, 2, 32, causal=False, page_size=16),  # group 3: not packed
    KVCacheCase((3, 40), 2, 48, 4, 2, 32, page_size=8, num_splits=2),  # a page per key, not per tile
    # v's head dim of its own (the output's): narrower and wider than the query's, padded or not
    Case(2, 37, 29, 4, 2, 48, head_dim_v=20, causal=True),
    Case(1, 33, 50, 2, 1, 16, head_dim_v=64, dtype="float16", window=(7, 3), head_bias=True),
    VarlenCase((5, 0, 40, 17), (7, 3, 33, 17), 4, 2, 32, head_dim_v=16, causal=True, alibi=True),
    KVCacheCase((0, 13, 50), 1, 64, 8, 2, 32, head_dim_v=48, page_size=16, num_splits=3, pack_gqa=True),
    # deterministic: the backward three times, bit-identical
    Case(2, 37, 45, 4, 2, 32, causal=True, head_bias=True, deterministic=True),
    VarlenCase((5, 0, 40, 17), (7, 3, 33, 17), 4, 2, 32, window=(9, 3), deterministic=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernels_within_twice_pytorch_error(case):
    row = run_case(case, DEVICE)
    errors = {k: v for k, v in row.items() if k.endswith("_err")}
    assert row["ok"], errors


def test_deterministic_cases_fail_on_runs_that_differ():
    """The grid's repeat rule: a deterministic case passes only if every run's gradients equal the first's."""
    from sigattn.testing import grid

    a, b = torch.ones(3), torch.ones(3)
    assert grid._repeats({"ok": True}, [(a, a, a, None), (b, b, b, None)]) == {"ok": True, "repeats_identical": True}
    c = b.clone()
    c[1] = 1 + 2**-20
    assert grid._repeats({"ok": True}, [(a, a, a, None), (b, c, b, None)]) == {"ok": False, "repeats_identical": False}
    assert grid._repeats({"ok": True}, [(a, a, a, None)]) == {"ok": True}  # one run: nothing to compare


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=lambda c: c.id)
def test_tma_loads_within_twice_pytorch_error(monkeypatch, case):
    """Rows this short load K/V through pointers; with the length threshold lowered, through TMA."""
    monkeypatch.setattr(triton_host, "TMA_MIN_KEYS", 1)
    made, descriptor = [], triton_host.TensorDescriptor
    monkeypatch.setattr(triton_host, "TensorDescriptor", lambda *args: made.append(args) or descriptor(*args))
    row = run_case(case, DEVICE)
    assert made and row["ok"], {k: v for k, v in row.items() if k.endswith("_err")}


def test_kvcache_plan_splits_small_batches_and_widens_tiles_for_large_ones(monkeypatch):
    """The plan outside the interpreter (whose tiles are fixed small), on the CPU's stand-in of 4 SMs."""
    monkeypatch.setattr(triton_host, "INTERPRET", False)
    cpu = torch.device("cpu")
    few, many = triton_host.KVCACHE_CONFIGS[128], triton_host.KVCACHE_MANY_PROGRAMS_CONFIGS[128]
    # one row, one kv head: one packed program of 4 query heads, split in 4 (one program per SM)
    cfg, pack, splits = triton_host.kvcache_plan(1, 1, 4, 1, 128, 8192, cpu)
    assert (cfg.block_m, cfg.block_n, pack, splits) == (16, few.block_n, True, 4)
    # 8 programs, two per SM: no split, wide tiles; a paged cache keeps its own table
    cfg, pack, splits = triton_host.kvcache_plan(8, 1, 4, 1, 128, 8192, cpu)
    assert (cfg.block_n, cfg.num_warps, cfg.num_stages, splits) == (many.block_n, many.num_warps, many.num_stages, 1)
    cfg, _, _ = triton_host.kvcache_plan(8, 1, 4, 1, 128, 8192, cpu, paged=True)
    assert cfg.block_n == triton_host.KVCACHE_PAGED_CONFIGS[128].block_n
    # head dims without a wide table keep theirs
    assert triton_host.kvcache_plan(8, 1, 4, 1, 256, 8192, cpu)[0].block_n == triton_host.KVCACHE_CONFIGS[256].block_n
    # a short cache with as many programs: the shallower ring
    short = triton_host.KVCACHE_SHORT_MANY_PROGRAMS_CONFIGS[128]
    for capacity in (1024, triton_host.KVCACHE_SHORT_KEYS):
        cfg, _, splits = triton_host.kvcache_plan(8, 1, 4, 1, 128, capacity, cpu)
        assert (cfg.block_n, cfg.num_warps, cfg.num_stages, splits) == (
            short.block_n,
            short.num_warps,
            short.num_stages,
            1,
        )
    assert triton_host.kvcache_plan(8, 1, 4, 1, 128, triton_host.KVCACHE_SHORT_KEYS + 1, cpu)[0].block_n == many.block_n


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
        out = flash.sigmoid_attn_flash(q, k, v, Params(0.3, Mask(causal, window, top_left)), bias, alibi)
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
    params = Params(0.2, Mask(causal=True))
    first = kernels.backward(do, q, k, v, params, bias)
    second = kernels.backward(do, q, k, v, params, bias)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_every_output_element_written():
    """Poisoned buffers: a row with no allowed key must still be written (as 0)."""
    q, k, v = (torch.randn(1, 20, 2, 16).to(DEVICE, torch.float16) for _ in range(3))
    out = torch.full_like(q, math.nan)
    kernels.forward(q, k[:, :4], v[:, :4], Params(0.25, Mask(causal=True)), resolve_bias(None, 4), out=out)
    assert not out.isnan().any()
    assert (out[:, :16] == 0).all()  # Sq=20, Sk=4: rows 0..15 see nothing


@pytest.mark.parametrize("pack_gqa", [False, True], ids=["per-head", "packed"])
def test_kvcache_split_sum_into_a_strided_out(pack_gqa):
    """Split keys into a caller's ``out`` that is a view into a wider poisoned buffer: the splits' sum lands
    in the view, the other columns stay untouched, and a second call gives the same values."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 4, 32, generator=gen).to(DEVICE, torch.float16)
    k_cache, v_cache = (torch.randn(3, 96, 2, 32, generator=gen).to(DEVICE, torch.float16) for _ in "kv")
    lens = torch.tensor([0, 50, 96], dtype=torch.int32, device=DEVICE)
    params = Params(32**-0.5, Mask(causal=True))
    whole = kernels.decode(q, k_cache, v_cache, params, None, None, lens, num_splits=1, pack_gqa=pack_gqa)
    wide = torch.full((3, 2, 4, 64), math.nan, dtype=q.dtype, device=DEVICE)
    out = wide[..., 16:48]
    for _ in range(2):
        kernels.decode(q, k_cache, v_cache, params, None, None, lens, out=out, num_splits=3, pack_gqa=pack_gqa)
        torch.testing.assert_close(out, whole, atol=2e-3, rtol=0)
    assert wide[..., :16].isnan().all() and wide[..., 48:].isnan().all()


def test_triton_backend_declines_with_reasons():
    from sigattn.backends import BACKENDS, AttnCall

    q = torch.randn(1, 4, 2, 300, dtype=torch.float64, requires_grad=True)
    call = AttnCall("kvcache", q, q, q, 1.0, None, Mask(), None, False)
    reasons = " ".join(BACKENDS["triton"].not_supported_reasons(call))
    assert "float64" in reasons and "head dim 300" in reasons and "q requires grad" in reasons
    # A bias that requires grad would get none from the KV-cache kernel (its output had no graph).
    bias = torch.zeros(2, requires_grad=True)
    call = AttnCall("kvcache", q.detach(), q.detach(), q.detach(), 1.0, bias, Mask(), None, False)
    assert "the bias tensor requires grad" in " ".join(BACKENDS["triton"].not_supported_reasons(call))
    with torch.no_grad():
        assert "requires grad" not in " ".join(BACKENDS["triton"].not_supported_reasons(call))


def test_compiles_without_graph_breaks():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 17, 2, 16, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(3))
    bias = torch.randn(2, generator=gen).to(DEVICE).requires_grad_()

    def f(q, k, v, bias):
        return flash.sigmoid_attn_flash(q, k, v, Params(0.25, Mask(causal=True)), bias, None)

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


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "varlen"])
def test_double_backward_raises_instead_of_dropping_the_second_order_term(monkeypatch, packed):
    """The kernels' backward has no derivative: under create_graph=True its gradients are right, and a loss
    built on them (a gradient penalty) raises when differentiated, instead of losing that term."""
    monkeypatch.setenv("SIGATTN_BACKEND", "triton")
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 9, 2, 16, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_() for _ in range(3))
    bias = torch.randn(2, generator=gen).to(DEVICE).requires_grad_()

    def attend(q, k, v):
        if not packed:
            return sigattn.sigmoid_attn_func(q, k, v, bias=bias, causal=True)
        cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
        return sigattn.sigmoid_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, bias=bias, causal=True)

    inputs = (q, k, v, bias)
    expected = torch.autograd.grad(attend(q, k, v).float().sum(), inputs)
    out = attend(q, k, v)
    grads = torch.autograd.grad(out.float().sum(), inputs, create_graph=True)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected, strict=True))
    penalty = out.float().sum() + sum(g.float().square().sum() for g in grads)
    with pytest.raises(RuntimeError, match=r"'triton' backend has no double backward"):
        penalty.backward()


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


def _packed(lengths, heads, head_dim, gen):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return torch.randn(sum(lengths), heads, head_dim, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_(), cu


def test_public_varlen_runs_on_triton_backend(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    q, cu_q = _packed((9, 0, 21), 4, 32, gen)
    k, cu_k = _packed((9, 4, 25), 2, 32, gen)
    v = torch.randn(k.shape, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    args = (q, k, v, cu_q, cu_k, 21, 25)
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("SIGATTN_BACKEND", backend)
        out = sigattn.sigmoid_attn_varlen_func(*args, causal=True)
        results[backend] = (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for got, expected in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, expected, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_public_kvcache_runs_on_triton_backend(monkeypatch, paged):
    """Append then attend, on both backends: same output, same cache contents."""
    gen = torch.Generator().manual_seed(7)
    batch, capacity, page_size = 3, 48, 16

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, torch.bfloat16)

    q, k_new, v_new = randn(batch, 2, 8, 32), randn(batch, 2, 2, 32), randn(batch, 2, 2, 32)
    shape = (batch * capacity // page_size, page_size, 2, 32) if paged else (batch, capacity, 2, 32)
    k_cache, v_cache = randn(*shape), randn(*shape)
    block_table = None
    if paged:
        block_table = torch.randperm(shape[0], generator=gen).reshape(batch, -1).to(DEVICE, torch.int32)
    cache_seqlens = torch.tensor([0, 17, 46], dtype=torch.int32, device=DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        kc, vc = k_cache.clone(), v_cache.clone()
        monkeypatch.setenv("SIGATTN_BACKEND", backend)
        out = sigattn.sigmoid_attn_with_kvcache(
            q, kc, vc, k_new, v_new, cache_seqlens=cache_seqlens, block_table=block_table, causal=True
        )
        results[backend] = (out, kc, vc)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=3e-2, rtol=2e-2)
    assert torch.equal(results["triton"][1], results["torch"][1])
    assert torch.equal(results["triton"][2], results["torch"][2])
    full = {}  # no cache_seqlens: every row attends to its whole cache
    for backend in ("triton", "torch"):
        monkeypatch.setenv("SIGATTN_BACKEND", backend)
        full[backend] = sigattn.sigmoid_attn_with_kvcache(q, k_cache, v_cache, block_table=block_table, bias=-3.0)
    torch.testing.assert_close(full["triton"], full["torch"], atol=3e-2, rtol=2e-2)


def test_inference_ops_compile_without_graph_breaks():
    gen = torch.Generator().manual_seed(8)
    q, cu_q = _packed((9, 0, 21), 4, 16, gen)
    k, cu_k = _packed((9, 4, 25), 2, 16, gen)
    q_dec = torch.randn(2, 1, 4, 16, generator=gen).to(DEVICE, torch.bfloat16)
    cache = torch.randn(2, 32, 2, 16, generator=gen).to(DEVICE, torch.bfloat16)
    lens = torch.tensor([5, 32], dtype=torch.int32, device=DEVICE)
    params = Params(0.25, Mask(causal=True))

    def f(q, k, q_dec, cache):
        packed = flash.sigmoid_attn_varlen_flash(q, k, k, Rows.packed(cu_q, cu_k, 21, 25), params, None, None)
        decoded = flash.sigmoid_attn_kvcache_flash(q_dec, cache, cache, lens, None, params, None, None)
        return packed, decoded

    compiled = torch.compile(f, fullgraph=True, backend="eager" if DEVICE == "cpu" else "inductor")
    for got, expected in zip(compiled(q, k, q_dec, cache), f(q, k, q_dec, cache), strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_cuda_graph_replays_as_the_cache_grows():
    """Capture one decode step; replaying it after the cache grew (lengths live in device tensors) gives
    the eager result of the new step."""
    gen = torch.Generator().manual_seed(9)
    batch, capacity = 2, 4096

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, torch.bfloat16)

    k_cache, v_cache = randn(batch, capacity, 2, 64), randn(batch, capacity, 2, 64)
    q, k_new, v_new = randn(batch, 1, 8, 64), randn(batch, 1, 2, 64), randn(batch, 1, 2, 64)
    cache_seqlens = torch.tensor([100, 2000], dtype=torch.int32, device=DEVICE)

    def step():
        return sigattn.sigmoid_attn_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens, causal=True, bias=-8.0
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up: compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):  # the cache grows by one token per step
        cache_seqlens += 1
        q.copy_(randn(*q.shape))
        k_new.copy_(randn(*k_new.shape))
        v_new.copy_(randn(*v_new.shape))
        k_before, v_before = k_cache.clone(), v_cache.clone()
        graph.replay()
        replayed = out.clone()
        k_after, v_after = k_cache.clone(), v_cache.clone()
        k_cache.copy_(k_before)
        v_cache.copy_(v_before)
        eager = step()
        torch.testing.assert_close(replayed, eager, atol=0, rtol=0)
        assert torch.equal(k_cache, k_after) and torch.equal(v_cache, v_after)


def test_grid_shards_partition_the_cases(monkeypatch, capsys):
    """``--shard K/N`` for K = 0..N-1 runs every case of the grid exactly once; a malformed shard is a
    usage error naming the option."""
    from sigattn.testing import grid

    ran = []
    monkeypatch.setattr(grid, "run_case", lambda case, device: ran.append(case.id) or {"id": case.id, "ok": True})
    assert grid.main(["--quick"]) == 0
    everything = list(ran)
    shards = []
    for k in range(3):
        ran.clear()
        assert grid.main(["--quick", "--shard", f"{k}/3"]) == 0
        shards.append(list(ran))
    assert sorted(sum(shards, [])) == sorted(everything) and len(everything) > 3
    for bad in ("3/3", "1", "-1/2", "a/b"):
        with pytest.raises(SystemExit):
            grid.main(["--shard", bad])
        assert "argument --shard: " in capsys.readouterr().err  # ("-1/2" reads as an option: expected one argument)
