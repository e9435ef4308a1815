"""``sigmoid_attn_with_kvcache``: equals recomputing with ``sigmoid_attn_func`` over each row's cache
prefix plus the new keys; appends in place at the right positions; paged equals contiguous.

Cache slots past a row's length hold NaN, so any leak of them into the output shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import alibi_slopes

import sigattn
from sigattn import sigmoid_attn_func, sigmoid_attn_with_kvcache

NAN = float("nan")


@dataclass(frozen=True)
class CacheCase:
    cache_seqlens: tuple[int, ...]
    seqlen_q: int
    seqlen_new: int  # 0: no k, v given
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    capacity: int = 32
    page_size: int = 8
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    alibi: str | None = None
    bias: str = "default"

    @property
    def id(self) -> str:
        lens = "_".join(map(str, self.cache_seqlens))
        parts = [
            f"B{len(self.cache_seqlens)}-cache{lens}-Sq{self.seqlen_q}-new{self.seqlen_new}-H{self.heads}"
            f"-Hkv{self.kv_heads}-D{self.head_dim}-cap{self.capacity}"
        ]
        parts += ["causal"] if self.causal else []
        parts += [f"win{self.window[0]}_{self.window[1]}"] if self.window != (-1, -1) else []
        parts += [f"alibi{self.alibi}"] if self.alibi else []
        parts += [f"bias{self.bias}"] if self.bias != "default" else []
        return "-".join(parts)

    @property
    def batch(self) -> int:
        return len(self.cache_seqlens)

    def options(self) -> dict:
        opts = dict(causal=self.causal, window_size=self.window)
        opts["alibi_slopes"] = alibi_slopes(self.alibi, self.batch, self.heads)
        if self.bias == "float":
            opts["bias"] = -2.0
        elif self.bias == "tensor":
            opts["bias"] = torch.linspace(-3.0, -1.0, self.heads, dtype=torch.float64)
        return opts


def logical_cache(case: CacheCase) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, capacity, Hkv, D) k and v caches holding NaN past each row's cache_seqlens."""
    shape = (case.batch, case.capacity, case.kv_heads, case.head_dim)
    k_cache, v_cache = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    for b, n in enumerate(case.cache_seqlens):
        k_cache[b, n:] = NAN
        v_cache[b, n:] = NAN
    return k_cache, v_cache


def page(case: CacheCase, k_cache: torch.Tensor, v_cache: torch.Tensor):
    """The logical caches in a paged layout: a random permutation of pages, NaN in the spare pages and -1
    in block_table past each row's last used page. Returns (k_paged, v_paged, block_table)."""
    max_blocks = case.capacity // case.page_size
    num_blocks = case.batch * max_blocks + 3
    perm = torch.randperm(num_blocks)[: case.batch * max_blocks].reshape(case.batch, max_blocks)
    k_paged = torch.full((num_blocks, case.page_size, case.kv_heads, case.head_dim), NAN, dtype=torch.float64)
    v_paged = k_paged.clone()
    for b in range(case.batch):
        for p in range(max_blocks):
            rows = slice(p * case.page_size, (p + 1) * case.page_size)
            k_paged[perm[b, p]] = k_cache[b, rows]
            v_paged[perm[b, p]] = v_cache[b, rows]
    block_table = perm.to(torch.int32)
    for b, n in enumerate(case.cache_seqlens):
        used = -(-(n + case.seqlen_new) // case.page_size)
        block_table[b, used:] = -1
    return k_paged, v_paged, block_table


def unpage(case: CacheCase, paged: torch.Tensor, block_table: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The logical (B, capacity, Hkv, D) view of a paged cache; unused pages are taken from ``full``."""
    out = full.clone()
    for b in range(case.batch):
        for p, blk in enumerate(block_table[b].tolist()):
            if blk >= 0:
                out[b, p * case.page_size : (p + 1) * case.page_size] = paged[blk]
    return out


def recompute(case: CacheCase, q, k_cache, v_cache, k, v, opts) -> torch.Tensor:
    """Row by row: sigmoid_attn_func over the cache prefix of cache_seqlens[b] tokens plus the new keys."""
    outs = []
    for b, n in enumerate(case.cache_seqlens):
        keys, values = k_cache[b : b + 1, :n], v_cache[b : b + 1, :n]
        if k is not None:
            keys, values = torch.cat([keys, k[b : b + 1]], 1), torch.cat([values, v[b : b + 1]], 1)
        row_opts = dict(opts)
        if opts["alibi_slopes"] is not None and opts["alibi_slopes"].dim() == 2:
            row_opts["alibi_slopes"] = opts["alibi_slopes"][b : b + 1]
        outs.append(sigmoid_attn_func(q[b : b + 1], keys, values, **row_opts))
    return torch.cat(outs)


def expected_after_append(case: CacheCase, cache: torch.Tensor, new: torch.Tensor | None) -> torch.Tensor:
    out = cache.clone()
    if new is not None:
        for b, n in enumerate(case.cache_seqlens):
            out[b, n : n + case.seqlen_new] = new[b]
    return out


def assert_identical(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


CASES = [
    CacheCase((0, 7, 21), 1, 1),  # decode
    CacheCase((0, 7, 21), 1, 1, causal=True),
    CacheCase((0, 7, 21), 5, 5, causal=True),  # chunked prefill
    CacheCase((3, 16, 24), 5, 5, causal=False, alibi="BH", bias="tensor"),
    CacheCase((0, 9, 27), 3, 5, causal=True, window=(6, -1), alibi="H"),  # Sq != seqlen_new
    CacheCase((2, 16, 30), 4, 0, causal=True),  # no new keys: attend to the cache as it is
    CacheCase((0, 5, 13), 3, 3, heads=4, kv_heads=1, capacity=24, page_size=4, causal=True, bias="float"),
    CacheCase((1, 12), 6, 2, heads=2, kv_heads=2, causal=True),  # Sq > Sk for row 0: 3 rows see nothing
]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kvcache_equals_recompute(case, paged):
    q = torch.randn(case.batch, case.seqlen_q, case.heads, case.head_dim, dtype=torch.float64)
    k = v = None
    if case.seqlen_new:
        k, v = (
            torch.randn(case.batch, case.seqlen_new, case.kv_heads, case.head_dim, dtype=torch.float64) for _ in "kv"
        )
    k_cache, v_cache = logical_cache(case)
    opts = case.options()
    cache_seqlens = torch.tensor(case.cache_seqlens, dtype=torch.int32)
    seqlens_before = cache_seqlens.clone()
    if paged:
        k_arg, v_arg, block_table = page(case, k_cache, v_cache)
        k_paged_before, v_paged_before = k_arg.clone(), v_arg.clone()
    else:
        k_arg, v_arg, block_table = k_cache.clone(), v_cache.clone(), None

    with sigattn.use_backend("torch"):
        out = sigmoid_attn_with_kvcache(
            q, k_arg, v_arg, k, v, cache_seqlens=cache_seqlens, block_table=block_table, **opts
        )
        expected = recompute(case, q, k_cache, v_cache, k, v, opts)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert torch.equal(cache_seqlens, seqlens_before), "cache_seqlens must not be updated"

    k_expected, v_expected = expected_after_append(case, k_cache, k), expected_after_append(case, v_cache, v)
    if paged:
        assert_identical(unpage(case, k_arg, block_table, k_expected), k_expected, "k_cache")
        assert_identical(unpage(case, v_arg, block_table, v_expected), v_expected, "v_cache")
        # Pages no row uses are untouched.
        used = set(block_table[block_table >= 0].tolist())
        spare = [p for p in range(k_arg.shape[0]) if p not in used]
        assert_identical(k_arg[spare], k_paged_before[spare], "spare k pages")
        assert_identical(v_arg[spare], v_paged_before[spare], "spare v pages")
    else:
        assert_identical(k_arg, k_expected, "k_cache")
        assert_identical(v_arg, v_expected, "v_cache")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_paged_equals_contiguous_and_backends_agree(causal):
    case = CacheCase((0, 7, 21), 4, 4, causal=causal, alibi="BH", bias="tensor")
    q = torch.randn(case.batch, case.seqlen_q, case.heads, case.head_dim, dtype=torch.float64)
    k, v = (torch.randn(case.batch, 4, case.kv_heads, case.head_dim, dtype=torch.float64) for _ in "kv")
    k_cache, v_cache = logical_cache(case)
    cache_seqlens = torch.tensor(case.cache_seqlens, dtype=torch.int32)
    opts = case.options()
    outs = {}
    for backend in ("torch", "reference"):
        for paged in (False, True):
            if paged:
                kc, vc, bt = page(case, k_cache, v_cache)
            else:
                kc, vc, bt = k_cache.clone(), v_cache.clone(), None
            with sigattn.use_backend(backend):
                outs[backend, paged] = sigmoid_attn_with_kvcache(
                    q, kc, vc, k, v, cache_seqlens=cache_seqlens, block_table=bt, **opts
                )
    first = outs["torch", False]
    assert torch.isfinite(first).all()
    for key, out in outs.items():
        torch.testing.assert_close(out, first, atol=1e-12, rtol=1e-12, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_cache_seqlens_as_int(paged):
    case = CacheCase((9, 9, 9), 2, 2, causal=True)
    q = torch.randn(3, 2, 4, 16, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 2, 16, dtype=torch.float64) for _ in "kv")
    k_cache, v_cache = logical_cache(case)
    kc, vc, bt = page(case, k_cache, v_cache) if paged else (k_cache.clone(), v_cache.clone(), None)
    with sigattn.use_backend("torch"):
        out = sigmoid_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=9, block_table=bt, causal=True)
        expected = recompute(case, q, k_cache, v_cache, k, v, case.options())
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    logical = unpage(case, kc, bt, k_cache) if paged else kc
    assert_identical(logical, expected_after_append(case, k_cache, k), "k_cache")


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_no_cache_seqlens_means_full_cache(paged):
    case = CacheCase((32, 32), 3, 0, causal=True, alibi="H")
    q = torch.randn(2, 3, 4, 16, dtype=torch.float64)
    k_cache, v_cache = logical_cache(case)
    kc, vc, bt = page(case, k_cache, v_cache) if paged else (k_cache, v_cache, None)
    opts = case.options()
    with sigattn.use_backend("torch"):
        out = sigmoid_attn_with_kvcache(q, kc, vc, block_table=bt, **opts)
        expected = sigmoid_attn_func(q, k_cache, v_cache, **opts)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_empty_cache_without_new_keys_outputs_zero():
    case = CacheCase((0, 4), 2, 0)
    q = torch.randn(2, 2, 4, 16, dtype=torch.float64)
    k_cache, v_cache = logical_cache(case)
    with sigattn.use_backend("torch"):
        out = sigmoid_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out).all() and (out[1].abs().sum(-1) > 0).all()


def test_query_gradient():
    """Only q may require grad; its gradient equals the recomputed one."""
    case = CacheCase((0, 7, 21), 3, 3, causal=True)
    q = torch.randn(3, 3, 4, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, 3, 2, 16, dtype=torch.float64) for _ in "kv")
    k_cache, v_cache = logical_cache(case)
    opts = case.options()
    with sigattn.use_backend("torch"):
        out = sigmoid_attn_with_kvcache(
            q,
            k_cache.clone(),
            v_cache.clone(),
            k,
            v,
            cache_seqlens=torch.tensor(case.cache_seqlens, dtype=torch.int32),
            **opts,
        )
        expected = recompute(case, q, k_cache, v_cache, k, v, opts)
    dout = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, q, dout)
    (dq_expected,) = torch.autograd.grad(expected, q, dout)
    assert torch.isfinite(dq).all()
    torch.testing.assert_close(dq, dq_expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_low_precision_cache(dtype):
    case = CacheCase((0, 7, 21), 2, 2, causal=True)
    q = torch.randn(3, 2, 4, 16, dtype=dtype)
    k, v = (torch.randn(3, 2, 2, 16, dtype=dtype) for _ in "kv")
    k_cache, v_cache = (t.to(dtype) for t in logical_cache(case))
    kc, vc, bt = page(case, k_cache, v_cache)
    kc, vc = kc.to(dtype), vc.to(dtype)
    with sigattn.use_backend("torch"):
        out = sigmoid_attn_with_kvcache(
            q,
            kc,
            vc,
            k,
            v,
            cache_seqlens=torch.tensor(case.cache_seqlens, dtype=torch.int32),
            block_table=bt,
            causal=True,
        )
        expected = recompute(case, q, k_cache, v_cache, k, v, case.options())
    assert out.dtype == dtype and torch.isfinite(out).all()
    # Both compute in float32 and round once to dtype: they may differ by one unit in the last place.
    ulp = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=ulp)
