"""Bad inputs raise ValueError or TypeError whose message names the argument; NaN and Inf inputs run
through and give NaN exactly where the math does."""

from __future__ import annotations

import re

import pytest
import torch

import sigattn
from sigattn import (
    scaled_dot_product_sigmoid_attention,
    sigmoid_attn_func,
    sigmoid_attn_varlen_func,
    sigmoid_attn_with_kvcache,
)
from sigattn.ops.sigmoid_attn.reference import sigmoid_attn_reference

F64 = torch.float64
I32 = torch.int32


def t(*shape, dtype=F64, device="cpu"):
    return (
        torch.randn(shape, dtype=dtype, device=device) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    )


def ints(*values, dtype=I32):
    return torch.tensor(values, dtype=dtype)


# sigmoid_attn_func: q (2, 5, 4, 16), k and v (2, 7, 2, 16).
def dense(q=None, k=None, v=None, **kw):
    q = t(2, 5, 4, 16) if q is None else q
    k = t(2, 7, 2, 16) if k is None else k
    v = t(*k.shape, dtype=k.dtype, device=k.device) if v is None else v
    return sigmoid_attn_func(q, k, v, **kw)


# sigmoid_attn_varlen_func: sequences of 4 and 6 queries, 5 and 7 keys.
def varlen(q=None, k=None, cu_q=None, cu_k=None, max_q=6, max_k=7, **kw):
    q = t(10, 4, 16) if q is None else q
    k = t(12, 2, 16) if k is None else k
    cu_q = ints(0, 4, 10) if cu_q is None else cu_q
    cu_k = ints(0, 5, 12) if cu_k is None else cu_k
    return sigmoid_attn_varlen_func(q, k, t(*k.shape, dtype=k.dtype), cu_q, cu_k, max_q, max_k, **kw)


# sigmoid_attn_with_kvcache: q (2, 1, 4, 16), caches (2, 8, 2, 16) or paged (6, 4, 2, 16).
def kvcache(q=None, k_cache=None, k="new", v="new", cache_seqlens=(3, 5), **kw):
    q = t(2, 1, 4, 16) if q is None else q
    k_cache = t(2, 8, 2, 16) if k_cache is None else k_cache
    k = t(2, 1, 2, 16) if isinstance(k, str) else k
    v = t(2, 1, 2, 16) if isinstance(v, str) else v
    if isinstance(cache_seqlens, tuple):
        cache_seqlens = ints(*cache_seqlens)
    return sigmoid_attn_with_kvcache(q, k_cache, k_cache.clone(), k, v, cache_seqlens=cache_seqlens, **kw)


def paged(block_table, cache_seqlens=(3, 5), k="new", v="new"):
    return kvcache(k_cache=t(6, 4, 2, 16), block_table=block_table, cache_seqlens=cache_seqlens, k=k, v=v)


# scaled_dot_product_sigmoid_attention: query (2, 4, 5, 16), key and value (2, 4 or 2, 7, 16).
def sdpa(query=None, kv_heads=4, **kw):
    query = t(2, 4, 5, 16) if query is None else query
    key = t(2, kv_heads, 7, 16)
    return scaled_dot_product_sigmoid_attention(query, key, key.clone(), **kw)


# (id, call, exception, regex the message must match: the argument's name and what is wrong)
BAD_INPUTS = [
    # ranks and types
    ("q-rank", lambda: dense(q=t(5, 4, 16)), ValueError, r"\bq must have 4 dimensions"),
    ("k-not-tensor", lambda: dense(k=[[1.0]], v=t(2, 7, 2, 16)), TypeError, r"\bk must be a torch.Tensor"),
    ("v-rank", lambda: dense(v=t(2, 7, 2, 16, 1)), ValueError, r"\bv must have 4 dimensions"),
    ("q-int-dtype", lambda: dense(q=t(2, 5, 4, 16, dtype=I32)), TypeError, r"\bq must be float16"),
    # batch, head dim, dtype, device, heads
    ("k-batch", lambda: dense(k=t(3, 7, 2, 16)), ValueError, r"\bk must have the batch size of q"),
    ("k-head-dim", lambda: dense(k=t(2, 7, 2, 8)), ValueError, r"\bk must have the head dim of q"),
    (
        "k-dtype",
        lambda: dense(k=t(2, 7, 2, 16, dtype=torch.float32)),
        TypeError,
        r"\bk must have the dtype of q",
    ),
    (
        "v-dtype",
        lambda: dense(v=t(2, 7, 2, 16, dtype=torch.float16)),
        TypeError,
        r"\bv must have the dtype of q",
    ),
    (
        "k-device",
        lambda: dense(k=t(2, 7, 2, 16, device="meta")),
        ValueError,
        r"\bk must be on the device of q",
    ),
    ("kv-shape", lambda: dense(v=t(2, 6, 2, 16)), ValueError, r"\bk and v must have the same shape"),
    ("heads-multiple", lambda: dense(k=t(2, 7, 3, 16)), ValueError, r"query heads \(4, q\).*\(3, k\)"),
    # options
    (
        "bias-shape",
        lambda: dense(bias=t(3)),
        ValueError,
        r"\bbias must be a float or a tensor of shape \(Hq,\)",
    ),
    ("bias-2d", lambda: dense(bias=t(2, 4)), ValueError, r"\bbias must be a float or a tensor of shape"),
    ("bias-type", lambda: dense(bias="-1"), TypeError, r"\bbias must be a float"),
    ("bias-bool", lambda: dense(bias=True), TypeError, r"\bbias must be a float"),
    ("bias-int-tensor", lambda: dense(bias=ints(0, 0, 0, 0)), TypeError, r"\bbias must be a floating-point"),
    ("bias-device", lambda: dense(bias=t(4, device="meta")), ValueError, r"\bbias must be on the device"),
    ("window-left", lambda: dense(window_size=(-2, 0)), ValueError, r"window_size entries must be >= -1"),
    ("window-right", lambda: dense(window_size=(3, -5)), ValueError, r"window_size entries must be >= -1"),
    ("window-type", lambda: dense(window_size=(1, 2, 3)), TypeError, r"window_size must be a pair of ints"),
    ("window-float", lambda: dense(window_size=(1.0, 2)), TypeError, r"window_size must be a pair of ints"),
    (
        "alibi-shape",
        lambda: dense(alibi_slopes=t(3, dtype=torch.float32)),
        ValueError,
        r"alibi_slopes must have shape",
    ),
    (
        "alibi-batch",
        lambda: dense(alibi_slopes=t(3, 4, dtype=torch.float32)),
        ValueError,
        r"alibi_slopes must have shape",
    ),
    ("alibi-dtype", lambda: dense(alibi_slopes=t(4)), TypeError, r"alibi_slopes must be float32"),
    (
        "alibi-type",
        lambda: dense(alibi_slopes=[0.1] * 4),
        TypeError,
        r"alibi_slopes must be a float32 tensor",
    ),
    (
        "alibi-requires-grad",
        lambda: dense(alibi_slopes=t(4, dtype=torch.float32).requires_grad_()),
        ValueError,
        r"alibi_slopes must not require grad",
    ),
    ("causal-type", lambda: dense(causal=1), TypeError, r"causal must be a bool"),
    ("deterministic-type", lambda: dense(deterministic="yes"), TypeError, r"deterministic must be a bool"),
    ("scale-type", lambda: dense(scale="0.5"), TypeError, r"scale must be a float"),
    # varlen
    ("varlen-q-rank", lambda: varlen(q=t(1, 10, 4, 16)), ValueError, r"\bq must have 3 dimensions"),
    (
        "cu-dtype",
        lambda: varlen(cu_q=ints(0, 4, 10, dtype=torch.int64)),
        TypeError,
        r"cu_seqlens_q must be int32",
    ),
    ("cu-type", lambda: varlen(cu_k=[0, 5, 12]), TypeError, r"cu_seqlens_k must be an int32 tensor"),
    ("cu-rank", lambda: varlen(cu_q=ints(0, 4, 10)[None]), ValueError, r"cu_seqlens_q must have shape 1-D"),
    ("cu-start", lambda: varlen(cu_q=ints(1, 4, 10)), ValueError, r"cu_seqlens_q must start at 0"),
    (
        "cu-monotone",
        lambda: varlen(cu_k=ints(0, 13, 12), max_k=13),
        ValueError,
        r"cu_seqlens_k must be non-decreasing",
    ),
    (
        "cu-end-q",
        lambda: varlen(cu_q=ints(0, 4, 9)),
        ValueError,
        r"cu_seqlens_q must end at the total .*\(10\)",
    ),
    (
        "cu-end-k",
        lambda: varlen(cu_k=ints(0, 5, 13)),
        ValueError,
        r"cu_seqlens_k must end at the total .*\(12\)",
    ),
    (
        "cu-batch",
        lambda: varlen(cu_k=ints(0, 12), max_k=12),
        ValueError,
        r"cu_seqlens_q and cu_seqlens_k must have the same shape",
    ),
    ("max-seqlen-q", lambda: varlen(max_q=5), ValueError, r"max_seqlen_q \(5\) is smaller than the longest"),
    ("max-seqlen-k", lambda: varlen(max_k=6), ValueError, r"max_seqlen_k \(6\) is smaller than the longest"),
    ("max-seqlen-type", lambda: varlen(max_q=6.0), TypeError, r"max_seqlen_q must be a non-negative int"),
    (
        "varlen-alibi-batch",
        lambda: varlen(alibi_slopes=t(3, 4, dtype=torch.float32)),
        ValueError,
        r"alibi_slopes must have shape .*\(B, Hq\) = \(2, 4\)",
    ),
    (
        "varlen-k-dtype",
        lambda: varlen(k=t(12, 2, 16, dtype=torch.float32)),
        TypeError,
        r"\bk must have the dtype",
    ),
    # kvcache
    ("k-without-v", lambda: kvcache(v=None), ValueError, r"\bk and v must be given together"),
    ("v-without-k", lambda: kvcache(k=None), ValueError, r"\bk and v must be given together"),
    ("append-needs-seqlens", lambda: kvcache(cache_seqlens=None), ValueError, r"cache_seqlens is required"),
    ("cache-too-small", lambda: kvcache(cache_seqlens=(3, 8)), ValueError, r"cache is too small.*\[4, 9\]"),
    (
        "paged-page-size-0",
        lambda: kvcache(
            k_cache=t(6, 0, 2, 16), block_table=ints(0, 1, 2, 3).reshape(2, 2), cache_seqlens=0, k=None, v=None
        ),
        ValueError,
        r"paged k_cache must have pages of at least 1 token",
    ),
    ("cache-too-small-int", lambda: kvcache(cache_seqlens=8), ValueError, r"cache is too small.*= 9 exceeds"),
    ("cache-seqlens-int-past-int32", lambda: kvcache(cache_seqlens=2**31), ValueError, r"cache is too small"),
    ("cache-seqlens-int-negative", lambda: kvcache(cache_seqlens=-1), ValueError, r"cache_seqlens must be >= 0"),
    (
        "cache-seqlens-negative",
        lambda: kvcache(cache_seqlens=(-1, 0)),
        ValueError,
        r"cache_seqlens must be >= 0",
    ),
    (
        "cache-seqlens-dtype",
        lambda: kvcache(cache_seqlens=ints(3, 5, dtype=torch.int64)),
        TypeError,
        r"cache_seqlens must be int32",
    ),
    (
        "cache-seqlens-length",
        lambda: kvcache(cache_seqlens=(3, 5, 1)),
        ValueError,
        r"cache_seqlens must have shape \(2,\)",
    ),
    ("cache-rank", lambda: kvcache(k_cache=t(2, 8, 32)), ValueError, r"k_cache must have 4 dimensions"),
    (
        "cache-batch",
        lambda: kvcache(k_cache=t(3, 8, 2, 16)),
        ValueError,
        r"k_cache must have the batch size of q",
    ),
    (
        "cache-dtype",
        lambda: kvcache(k_cache=t(2, 8, 2, 16, dtype=torch.float32)),
        TypeError,
        r"k_cache must have the dtype",
    ),
    (
        "new-k-dtype",
        lambda: kvcache(k=t(2, 1, 2, 16, dtype=torch.float32)),
        TypeError,
        r"\bk must match the cache's dtype",
    ),
    ("new-k-heads", lambda: kvcache(k=t(2, 1, 4, 16), v=t(2, 1, 4, 16)), ValueError, r"\bk must have shape"),
    ("new-k-batch", lambda: kvcache(k=t(1, 1, 2, 16), v=t(1, 1, 2, 16)), ValueError, r"\bk must have shape"),
    ("new-kv-shape", lambda: kvcache(v=t(2, 2, 2, 16)), ValueError, r"\bk and v must have the same length \(dim 1\)"),
    (
        "new-k-grad",
        lambda: kvcache(k=t(2, 1, 2, 16).requires_grad_()),
        ValueError,
        r"\bk, v, k_cache and v_cache must not",
    ),
    (
        "block-table-dtype",
        lambda: paged(ints(0, 1, 2, 3, dtype=torch.int64).reshape(2, 2)),
        TypeError,
        r"block_table must",
    ),
    (
        "block-table-rank",
        lambda: paged(ints(0, 1, 2, 3)),
        TypeError,
        r"block_table must be an int32 tensor of shape",
    ),
    (
        "block-table-batch",
        lambda: paged(ints(0, 1, 2, 3, 4, 5).reshape(3, 2)),
        ValueError,
        r"block_table must have shape",
    ),
    (
        "block-table-range",
        lambda: paged(ints(0, 1, 2, 6).reshape(2, 2)),
        ValueError,
        r"block_table entries in use .*\[6\]",
    ),
    (
        "block-table-negative",
        lambda: paged(ints(0, 1, -1, 3).reshape(2, 2)),
        ValueError,
        r"block_table entries in use",
    ),
    (
        "paged-too-small",
        lambda: paged(ints(0, 1, 2, 3).reshape(2, 2), cache_seqlens=(8, 2)),
        ValueError,
        r"max_blocks",
    ),
    (
        "paged-full-range",  # without cache_seqlens every page of every row is in use
        lambda: paged(ints(0, 1, 2, 9).reshape(2, 2), cache_seqlens=None, k=None, v=None),
        ValueError,
        r"block_table entries in use .*\[9\]",
    ),
    # SDPA
    ("sdpa-query-rank", lambda: sdpa(query=t(4, 5, 16)), ValueError, r"query must have 4 dimensions"),
    ("sdpa-gqa", lambda: sdpa(kv_heads=2), ValueError, r"enable_gqa=True"),
    (
        "sdpa-mask-shape",
        lambda: sdpa(attn_mask=t(5, 8)),
        ValueError,
        r"attn_mask must broadcast to .*\(2, 4, 5, 7\)",
    ),
    ("sdpa-mask-5d", lambda: sdpa(attn_mask=t(1, 2, 4, 5, 7)), ValueError, r"attn_mask must broadcast"),
    ("sdpa-mask-dtype", lambda: sdpa(attn_mask=t(5, 7, dtype=I32)), TypeError, r"attn_mask must be bool"),
    (
        "sdpa-mask-type",
        lambda: sdpa(attn_mask=[[True]]),
        TypeError,
        r"attn_mask must be a bool or float tensor",
    ),
    (
        "sdpa-mask-device",
        lambda: sdpa(attn_mask=t(5, 7, device="meta")),
        ValueError,
        r"attn_mask must be on the device",
    ),
    (
        "sdpa-mask-and-causal",
        lambda: sdpa(attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True),
        ValueError,
        r"attn_mask and is_causal cannot both be set",
    ),
    ("sdpa-is-causal-type", lambda: sdpa(is_causal=None), TypeError, r"is_causal must be a bool"),
    ("sdpa-enable-gqa-type", lambda: sdpa(enable_gqa=1), TypeError, r"enable_gqa must be a bool"),
    ("sdpa-bias-shape", lambda: sdpa(bias=t(2)), ValueError, r"\bbias must be a float or a tensor of shape"),
]


@pytest.mark.parametrize("call, exc, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(call, exc, message):
    with sigattn.use_backend("torch"), pytest.raises(exc, match=message):
        call()


def test_valid_versions_of_the_bad_inputs_run():
    """The helpers above with good arguments do run: each failure above is due to the one bad argument."""
    with sigattn.use_backend("torch"):
        assert dense().shape == (2, 5, 4, 16)
        assert dense(alibi_slopes=t(2, 4, dtype=torch.float32), bias=t(4), window_size=(2, 0)).shape == (
            2,
            5,
            4,
            16,
        )
        assert varlen().shape == (10, 4, 16)
        assert kvcache().shape == (2, 1, 4, 16)
        assert kvcache(cache_seqlens=(7, 0)).shape == (2, 1, 4, 16)  # exactly full
        assert sdpa(attn_mask=t(5, 7)).shape == (2, 4, 5, 16)
        assert sdpa(kv_heads=2, enable_gqa=True).shape == (2, 4, 5, 16)


def test_block_table_padding_past_used_pages_is_fine():
    """Row 0 needs 1 page (3 + 1 tokens), row 1 needs 2 (5 + 1): -1 or garbage after them is not read."""
    with sigattn.use_backend("torch"):
        out = paged(ints(4, -1, 0, 5).reshape(2, 2))
        out_garbage = paged(ints(4, 1000, 0, 5).reshape(2, 2))
    assert out.shape == out_garbage.shape == (2, 1, 4, 16)


def test_message_says_what_was_given():
    with pytest.raises(ValueError) as info:
        dense(k=t(3, 7, 2, 16))
    assert "(2)" in str(info.value) and "got 3" in str(info.value)
    with pytest.raises(TypeError) as info:
        dense(k=t(2, 7, 2, 16, dtype=torch.float32))
    assert "torch.float64" in str(info.value) and "torch.float32" in str(info.value)


def test_env_backend_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("SIGATTN_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match=re.escape("$SIGATTN_BACKEND") + r".*'cuda-please'"):
        dense()


# NaN and Inf: no crash, no hang; NaN exactly where the math gives NaN.


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_inputs_propagate_like_the_math(backend, causal):
    q, k, v = t(2, 40, 4, 16), t(2, 40, 2, 16), t(2, 40, 2, 16)
    q[0, 3, 1, 5] = float("nan")  # one query row of head 1
    k[1, 30, 0, 2] = float("nan")  # one key of kv head 0 (query heads 0, 1)
    with sigattn.use_backend(backend):
        out = sigmoid_attn_func(q, k, v, causal=causal)
    ref = sigmoid_attn_reference(q, k, v, causal=causal, upcast=False)
    expected = torch.zeros(2, 40, 4, dtype=torch.bool)
    expected[0, 3, 1] = True
    expected[1, 30 if causal else 0 :, :2] = True  # rows that see key 30
    assert torch.equal(out.isnan().any(-1), expected)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isnan().any(-1), out.isnan().all(-1))
    torch.testing.assert_close(out[~out.isnan()], ref[~ref.isnan()], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nan_in_values_and_gradients(dtype):
    q, k, v = (t(1, 33, 2, 16, dtype=dtype).requires_grad_() for _ in range(3))
    with torch.no_grad():
        v[0, 7, 1, 0] = float("nan")
    with sigattn.use_backend("torch"):
        out = sigmoid_attn_func(q, k, v)
    # Every query of head 1 reads value 7, only in its feature 0.
    assert out[..., 1, 0].isnan().all() and not out[..., 1, 1:].isnan().any() and not out[..., 0, :].isnan().any()
    out.backward(torch.ones_like(out))
    assert not q.grad[..., 0, :].isnan().any() and q.grad[..., 1, :].isnan().all()


def test_inf_inputs_do_not_crash():
    q, k, v = t(2, 17, 2, 16), t(2, 17, 2, 16), t(2, 17, 2, 16)
    q[0, 2, 0, 3] = float("inf")  # logits of that row are +-inf: weights exactly 0 or 1
    v[1, 4, 1, 0] = float("-inf")
    with sigattn.use_backend("torch"):
        out = sigmoid_attn_func(q, k, v, causal=True)
    ref = sigmoid_attn_reference(q, k, v, causal=True, upcast=False)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert torch.isfinite(out[0]).all()
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], atol=1e-10, rtol=1e-10)
    assert out[1, 4:, 1, 0].isneginf().all()


def test_device_values_are_read_only_when_asked(monkeypatch):
    """Reading cu_seqlens / cache_seqlens / block_table on a GPU would synchronise every call: only on
    request there; always on the CPU."""
    from sigattn.validation import CHECK_VALUES_ENV, values_checkable

    monkeypatch.delenv(CHECK_VALUES_ENV, raising=False)
    assert values_checkable(torch.device("cpu"))
    assert not values_checkable(torch.device("cuda", 0))
    monkeypatch.setenv(CHECK_VALUES_ENV, "1")
    assert values_checkable(torch.device("cuda", 0))


def test_an_int_cache_seqlens_is_checked_where_device_values_are_not(monkeypatch):
    """An int is a host value: reading it synchronises nothing, so it is checked where tensors' values are not
    (on a GPU an append past the cache would write out of bounds)."""
    monkeypatch.setattr(sigattn.validation, "values_checkable", lambda device=None: False)
    with sigattn.use_backend("torch"), pytest.raises(ValueError, match=r"cache is too small"):
        kvcache(cache_seqlens=8)
