"""Correctness grid of the Triton kernels: ``python -m sigattn.testing.grid [--quick] [--json PATH]``.

The rule is flash-attn's (``sigattn.testing.tolerance``): for the output and every gradient,
    max|kernel - float64 reference| <= 2 * max|PyTorch in the same precision - float64 reference| + rounding
where rounding = eps(dtype) * max|reference| (``rounding_term``) is the final cast of a float32 accumulator
to the output dtype.
Outputs and gradients are poisoned with NaN before each run, so an unwritten element fails. Dropout cases
compare with the reference applying the mask of the kernels' own seed (``dropout.keep_mask``).

Robustness rows (``RobustnessCase``) call the public functions on the kernels twice and require the same bits:
with auxiliary tensors as strided or expanded views and as contiguous copies, and with NaN and inf where no
query may look (the reference module's rule) and with finite values there.
On the CPU the same grid (smaller) runs through TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import re
import sys
from dataclasses import asdict, dataclass

import torch

from ..ops.sigmoid_attn.dropout import Dropout, draw_seed
from ..ops.sigmoid_attn.params import Params, Rows
from ..ops.sigmoid_attn.reference import (
    Mask,
    resolve_bias,
    sigmoid_attn_kvcache_reference,
    sigmoid_attn_reference,
    sigmoid_attn_varlen_reference,
)
from ..runinfo import run_meta, write_json
from .tolerance import allowed_error, max_error, rounding_term


class _ValueHeadDim:
    """What the case kinds with ``head_dim`` and ``head_dim_v`` fields share: v's head dim, and the id's mark
    of one other than the query's."""

    head_dim: int
    head_dim_v: int | None

    @property
    def dv(self) -> int:
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    @property
    def dv_id(self) -> str:
        return "" if self.head_dim_v is None else f"-Dv{self.head_dim_v}"


@dataclass(frozen=True)
class Case(_ValueHeadDim):
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    alibi: bool = False
    head_bias: bool = False
    top_left: bool = False
    dropout: float = 0.0  # attention dropout, checked against the reference applying the kernel's own mask
    head_dim_v: int | None = None  # v's head dim (the output's); None: head_dim
    deterministic: bool = False  # the backward again twice: every gradient bit-identical

    @property
    def id(self) -> str:
        parts = [
            f"B{self.batch}-Sq{self.seqlen_q}-Sk{self.seqlen_k}-H{self.heads}-Hkv{self.kv_heads}-D{self.head_dim}"
            + self.dv_id,
            {"bfloat16": "bf16", "float16": "fp16"}.get(self.dtype, self.dtype),
        ]
        parts += ["causal"] * self.causal + [f"win{self.window[0]}_{self.window[1]}"] * (self.window != (-1, -1))
        parts += ["alibi"] * self.alibi + ["headbias"] * self.head_bias + ["topleft"] * self.top_left
        parts += [f"dropout{self.dropout:g}"] * (self.dropout > 0) + ["deterministic"] * self.deterministic
        return "-".join(parts)


@dataclass(frozen=True)
class VarlenCase(_ValueHeadDim):
    """Packed sequences: forward and backward of the varlen kernels."""

    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    alibi: bool = False
    head_bias: bool = False
    dropout: float = 0.0
    head_dim_v: int | None = None
    deterministic: bool = False

    @property
    def id(self) -> str:
        lens = f"Sq{'_'.join(map(str, self.seqlens_q))}-Sk{'_'.join(map(str, self.seqlens_k))}"
        parts = [
            f"varlen-{lens}-H{self.heads}-Hkv{self.kv_heads}-D{self.head_dim}{self.dv_id}",
            _DTYPE_ID[self.dtype],
        ]
        parts += ["causal"] * self.causal + [f"win{self.window[0]}_{self.window[1]}"] * (self.window != (-1, -1))
        parts += ["alibi"] * self.alibi + ["headbias"] * self.head_bias
        parts += [f"dropout{self.dropout:g}"] * (self.dropout > 0) + ["deterministic"] * self.deterministic
        return "-".join(parts)


@dataclass(frozen=True)
class KVCacheCase(_ValueHeadDim):
    """Decode / chunked prefill: ``seqlen_new`` queries, keys and values appended to each row's cache of
    ``cache_seqlens[b]`` tokens (slots past it hold NaN). page_size 0 is a contiguous cache.
    num_splits / pack_gqa force a kernel path (None: the launcher's plan)."""

    cache_seqlens: tuple[int, ...]
    seqlen_new: int
    capacity: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    page_size: int = 0
    causal: bool = True
    window: tuple[int, int] = (-1, -1)
    alibi: bool = False
    head_bias: bool = False
    num_splits: int | None = None
    pack_gqa: bool | None = None
    head_dim_v: int | None = None

    @property
    def id(self) -> str:
        parts = [
            f"kvcache-B{len(self.cache_seqlens)}-cache{'_'.join(map(str, self.cache_seqlens))}-new{self.seqlen_new}"
            f"-cap{self.capacity}-H{self.heads}-Hkv{self.kv_heads}-D{self.head_dim}{self.dv_id}",
            _DTYPE_ID[self.dtype],
        ]
        parts += [f"page{self.page_size}"] * (self.page_size > 0) + ["causal"] * self.causal
        parts += [f"win{self.window[0]}_{self.window[1]}"] * (self.window != (-1, -1))
        parts += ["alibi"] * self.alibi + ["headbias"] * self.head_bias
        parts += [f"splits{self.num_splits}"] * (self.num_splits is not None)
        if self.pack_gqa is not None:
            parts.append("pack" if self.pack_gqa else "nopack")
        return "-".join(parts)


@dataclass(frozen=True)
class RobustnessCase:
    """One of ``ROBUSTNESS_CHECKS`` at head dim ``head_dim`` (64 and 128 reach the sm_90 kernels)."""

    check: str
    head_dim: int
    seqlen_q: int
    seqlen_k: int
    dtype: str = "bfloat16"

    @property
    def id(self) -> str:
        return f"robust-{self.check}-Sq{self.seqlen_q}-Sk{self.seqlen_k}-D{self.head_dim}-{_DTYPE_ID[self.dtype]}"


_DTYPE_ID = {"bfloat16": "bf16", "float16": "fp16"}
MODULE = "sigattn.testing.grid"  # python -m MODULE runs the grid
AnyCase = Case | VarlenCase | KVCacheCase | RobustnessCase


def judge(row: dict, names: list[str], ours: list, truths: list, baselines: list, dtype: torch.dtype) -> dict:
    """Applies the tolerance rule (its rounding term) to each named result: records ``<name>_err`` and
    ``<name>_pt_err`` (PyTorch's error) in ``row`` and ANDs the verdicts into ``row["ok"]``."""
    for name, mine, truth, baseline in zip(names, ours, truths, baselines, strict=True):
        err, base = max_error(mine, truth), max_error(baseline, truth)
        row[f"{name}_err"], row[f"{name}_pt_err"] = err, base
        row["ok"] &= err <= allowed_error(base, rounding_term(truth, dtype))
    return row


def reference_results(reference, tensors: list, bias, do, **options) -> dict[bool, list]:
    """{upcast: [out, *grads of tensors (and of bias when it is a tensor)]} of ``reference``."""
    results = {}
    for upcast in (True, False):
        ins = [t.detach().clone().requires_grad_() for t in tensors]
        leaf_bias = bias.detach().clone().requires_grad_() if bias is not None else None
        ref = reference(*ins, bias=leaf_bias, upcast=upcast, **options)
        leaves = ins + ([leaf_bias] if leaf_bias is not None else [])
        results[upcast] = [ref, *torch.autograd.grad(ref, leaves, do.double() if upcast else do)]
    return results


def run_case(case: AnyCase, device: str | torch.device, seed: int = 0) -> dict:
    """Run one case through the kernel launchers; returns errors, tolerances and ``ok``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, case.dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    runner = {Case: _run_dense, VarlenCase: _run_varlen, KVCacheCase: _run_kvcache, RobustnessCase: _run_robustness}[
        type(case)
    ]
    return runner(case, device, randn, gen)


def _extras(case, batch: int, gen, device):
    bias = torch.randn(case.heads, generator=gen).to(device) if case.head_bias else None
    alibi = (torch.rand(batch, case.heads, generator=gen) * 0.5).to(device) if case.alibi else None
    return bias, alibi


def _dropout(case, gen, device) -> Dropout | None:
    """The case's dropout with a seed from the case's generator: the kernels and the reference draw the same
    mask from it (``dropout.keep_mask``, the kernels' own mask)."""
    if not case.dropout:
        return None
    return Dropout(case.dropout, draw_seed(device, gen))


@contextlib.contextmanager
def _gluon_backward_at_every_length():
    """The grid checks kernels, not the speed rule that sends short calls to the Triton backward: inside,
    the Gluon backward takes every call it supports."""
    from ..ops.sigmoid_attn import hopper_bwd

    saved = hopper_bwd.TRITON_UP_TO_QUERIES
    hopper_bwd.TRITON_UP_TO_QUERIES = dict.fromkeys(saved, 0)
    try:
        yield
    finally:
        hopper_bwd.TRITON_UP_TO_QUERIES = saved


def _run_dense(case: Case, device, randn, gen) -> dict:
    from ..ops.sigmoid_attn import kernels

    q = randn(case.batch, case.seqlen_q, case.heads, case.head_dim)
    k = randn(case.batch, case.seqlen_k, case.kv_heads, case.head_dim)
    v = randn(case.batch, case.seqlen_k, case.kv_heads, case.dv)
    do = randn(case.batch, case.seqlen_q, case.heads, case.dv)
    bias, alibi = _extras(case, case.batch, gen, device)
    opts = dict(scale=case.head_dim**-0.5, causal=case.causal, window_size=case.window, top_left=case.top_left)
    opts["dropout"] = _dropout(case, gen, device)

    mask = Mask(case.causal, case.window, case.top_left)
    params = Params(opts["scale"], mask, deterministic=case.deterministic, dropout=opts["dropout"])
    kernel_bias = resolve_bias(bias, case.seqlen_k)
    out = torch.full_like(do, math.nan)
    kernels.forward(q, k, v, params, kernel_bias, alibi, out=out)
    with _gluon_backward_at_every_length():
        runs = _backward(case, do, q, k, v, params, kernel_bias, alibi)
        chosen = kernels.explain(False, q, k, v, params, kernel_bias, alibi, Rows.dense(q, k))

    results = reference_results(sigmoid_attn_reference, [q, k, v], bias, do, alibi_slopes=alibi, **opts)
    names = ["out", "dq", "dk", "dv"] + (["dbias"] if bias is not None else [])
    dq, dk, dv, dbias = runs[0]
    ours = [out, dq, dk, dv] + ([dbias] if bias is not None else [])
    return _repeats(judge(_row(case, chosen), names, ours, results[True], results[False], q.dtype), runs)


def _backward(case, do, q, k, v, *args) -> list[tuple]:
    """``kernels.backward``'s (dq, dk, dv, dbias) into NaN-poisoned buffers: once, or three times for a
    deterministic case."""
    from ..ops.sigmoid_attn import kernels

    runs = []
    for _ in range(3 if case.deterministic else 1):
        grads = tuple(torch.full_like(t, math.nan) for t in (q, k, v))
        runs.append(tuple(kernels.backward(do, q, k, v, *args, grads=grads)))
    return runs


def _repeats(row: dict, runs: list[tuple]) -> dict:
    """A deterministic case's verdict also asks that every run's gradients equal the first's bit for bit."""
    if len(runs) > 1:
        pairs = [(a, b) for run in runs[1:] for a, b in zip(runs[0], run, strict=True)]
        same = all((a is None and b is None) or torch.equal(a, b) for a, b in pairs)
        row["repeats_identical"] = same
        row["ok"] &= same
    return row


def _row(case: AnyCase, chosen: dict) -> dict:
    """The start of a case's result row: the case and the kernel that ran each direction."""
    return {"id": case.id, **asdict(case), **{f"{d}_kernel": name for d, (name, _) in chosen.items()}, "ok": True}


def _cumulative(lengths: tuple[int, ...], device) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _run_varlen(case: VarlenCase, device, randn, gen) -> dict:
    from ..ops.sigmoid_attn import kernels

    total_q, total_k = sum(case.seqlens_q), sum(case.seqlens_k)
    q = randn(total_q, case.heads, case.head_dim)
    k = randn(total_k, case.kv_heads, case.head_dim)
    v = randn(total_k, case.kv_heads, case.dv)
    do = randn(total_q, case.heads, case.dv)
    bias, alibi = _extras(case, len(case.seqlens_q), gen, device)
    cu_q, cu_k = _cumulative(case.seqlens_q, device), _cumulative(case.seqlens_k, device)
    rows = Rows.packed(cu_q, cu_k, max(case.seqlens_q), max(case.seqlens_k))
    opts = dict(scale=case.head_dim**-0.5, causal=case.causal, window_size=case.window)
    opts["dropout"] = _dropout(case, gen, device)

    params = Params(
        opts["scale"], Mask(case.causal, case.window), deterministic=case.deterministic, dropout=opts["dropout"]
    )
    out = torch.full_like(do, math.nan)
    kernels.forward(q, k, v, params, bias, alibi, rows, out=out)
    with _gluon_backward_at_every_length():
        runs = _backward(case, do, q, k, v, params, bias, alibi, rows)
        chosen = kernels.explain(False, q, k, v, params, bias, alibi, rows)

    def reference(q, k, v, **kw):
        return sigmoid_attn_varlen_reference(q, k, v, cu_q, cu_k, **kw)

    results = reference_results(reference, [q, k, v], bias, do, alibi_slopes=alibi, **opts)
    names = ["out", "dq", "dk", "dv"] + (["dbias"] if bias is not None else [])
    dq, dk, dv, dbias = runs[0]
    ours = [out, dq, dk, dv] + ([dbias] if bias is not None else [])
    return _repeats(judge(_row(case, chosen), names, ours, results[True], results[False], q.dtype), runs)


def _run_kvcache(case: KVCacheCase, device, randn, gen) -> dict:
    from ..ops.sigmoid_attn import kernels
    from ..ops.sigmoid_attn.cache import append_kv

    batch = len(case.cache_seqlens)
    q = randn(batch, case.seqlen_new, case.heads, case.head_dim)
    k_new = randn(batch, case.seqlen_new, case.kv_heads, case.head_dim)
    v_new = randn(batch, case.seqlen_new, case.kv_heads, case.dv)
    block_table = None
    if case.page_size:
        pages_per_row = case.capacity // case.page_size
        order = torch.randperm(batch * pages_per_row, generator=gen).to(device)  # pages in no particular order
        block_table = order.reshape(batch, pages_per_row).to(torch.int32)
        cache_shape = (batch * pages_per_row, case.page_size, case.kv_heads)
    else:
        cache_shape = (batch, case.capacity, case.kv_heads)
    k_cache, v_cache = randn(*cache_shape, case.head_dim), randn(*cache_shape, case.dv)
    cache_seqlens = torch.tensor(case.cache_seqlens, dtype=torch.int32, device=device)
    seqlens_k = cache_seqlens + case.seqlen_new
    _poison_unused_slots(k_cache, v_cache, seqlens_k, block_table)
    append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
    bias, alibi = _extras(case, batch, gen, device)
    opts = dict(scale=case.head_dim**-0.5, causal=case.causal, window_size=case.window)

    params = Params(opts["scale"], Mask(case.causal, case.window))
    out = q.new_full((*q.shape[:-1], case.dv), math.nan)
    kernels.decode(
        q,
        k_cache,
        v_cache,
        params,
        bias,
        alibi,
        seqlens_k,
        block_table,
        out,
        num_splits=case.num_splits,
        pack_gqa=case.pack_gqa,
    )
    results = {
        upcast: sigmoid_attn_kvcache_reference(
            q,
            k_cache,
            v_cache,
            seqlens_k,
            block_table=block_table,
            bias=bias,
            alibi_slopes=alibi,
            upcast=upcast,
            **opts,
        )
        for upcast in (True, False)
    }
    row = {"id": case.id, **asdict(case), "ok": True}
    return judge(row, ["out"], [out], [results[True]], [results[False]], q.dtype)


def _poison_unused_slots(k_cache, v_cache, seqlens_k, block_table) -> None:
    """NaN in every cache slot past a row's keys: a kernel that reads one fails."""
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size if block_table is not None else page_size
    pos = torch.arange(capacity, device=k_cache.device)
    unused = pos[None] >= seqlens_k[:, None].long()  # [B, capacity]
    if block_table is None:
        index = unused
    else:
        pages = block_table.long()[:, pos // page_size]  # [B, capacity]
        index = (pages[unused], (pos % page_size).expand_as(unused)[unused])
    k_cache[index] = math.nan
    v_cache[index] = math.nan


# ------------------------------------------------------------------------------------------------------
# robustness: the same bits whatever the strides of the small tensors and whatever no query may look at


def _outputs(fn, inputs: list[torch.Tensor], dout: torch.Tensor | None) -> list[torch.Tensor]:
    """fn(*leaves) and, unless ``dout`` is None (an inference call), the gradients of <fn, dout> w.r.t. the
    floating leaves but ALiBi slopes (the only 2-d floating inputs), from leaves that are detached views of
    ``inputs`` (their strides unchanged), on the kernels."""
    from .. import use_backend

    def wants_grad(t):
        return dout is not None and t.is_floating_point() and t.dim() != 2

    leaves = [t.detach().requires_grad_(wants_grad(t)) for t in inputs]  # views keep their strides
    with use_backend("triton"), _gluon_backward_at_every_length(), torch.set_grad_enabled(dout is not None):
        out = fn(*leaves)
        grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], dout) if dout is not None else ()
    return [out.detach(), *grads]


def _differences(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[str]:
    """What keeps ``got`` (an output, then gradients) from agreeing with ``want``: each result finite and equal
    bit for bit, but dQ (the second), which the sm_90 backward adds from several programs in no fixed order
    (not bit-reproducible even on equal inputs), within 4 units of its dtype's last place of its largest value."""
    found = []
    for index, (x, y) in enumerate(zip(got, want, strict=True)):
        if x.shape != y.shape or not bool(torch.isfinite(x).all()):
            found.append(f"result {index}: shape {tuple(x.shape)}, {int((~torch.isfinite(x)).sum())} not finite")
            continue
        if index == 1:
            diff = (x.float() - y.float()).abs().max().item() if x.numel() else 0.0
            if diff > 4 * torch.finfo(x.dtype).eps * (y.float().abs().max().item() if y.numel() else 0.0):
                found.append(f"dq: max difference {diff:.3g}")
        elif not torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)):
            found.append(f"result {index}: max difference {(x.float() - y.float()).abs().max().item():.3g}")
    return found


def _run_robustness(case: RobustnessCase, device, randn, gen) -> dict:
    """Runs the check's call on its clean and its dirty inputs (``dirty_dout`` the output gradient of the
    dirty run, None for an inference call) and compares the results with its ``compare`` (which lists what
    differs: ``_differences`` or a narrower look); a failing row records that (``detail``)."""
    clean, dirty, fn, dout, dirty_dout, compare = ROBUSTNESS_CHECKS[case.check](case, device, randn, gen)
    found = compare(_outputs(fn, dirty, dirty_dout), _outputs(fn, clean, dout))
    return {"id": case.id, **asdict(case), "ok": not found, **({"detail": "; ".join(found)} if found else {})}


def _strided(t: torch.Tensor) -> torch.Tensor:
    """t's values as a non-contiguous view: column 0 of a (..., 2) tensor whose column 1 is junk."""
    junk = torch.full_like(t, math.nan if t.is_floating_point() else 1 << 30)
    return torch.stack([t, junk], dim=-1)[..., 0]


def _dense_qkv(case, randn, heads=4, kv_heads=2):
    q = randn(1, case.seqlen_q, heads, case.head_dim)
    k, v = (randn(1, case.seqlen_k, kv_heads, case.head_dim) for _ in range(2))
    return q, k, v, randn(*q.shape)


def _strided_bias_alibi(case, device, randn, gen):
    """A per-head bias that is a column of a table (and, at head dims the sm_90 kernels do not take, ALiBi
    slopes stored transposed)."""
    from .. import sigmoid_attn_func

    q, k, v, dout = _dense_qkv(case, randn)
    bias = torch.randn(4, generator=gen).to(device) - 2
    slopes = (torch.rand(1, 4, generator=gen) * 0.3).to(device).expand(1, 4)
    if case.head_dim in (64, 128):  # the sm_90 kernels take a per-head bias but no ALiBi

        def call(q, k, v, bias):
            return sigmoid_attn_func(q, k, v, bias=bias, causal=True)

        return [q, k, v, bias], [q, k, v, _strided(bias)], call, dout, dout, _differences

    def call_alibi(q, k, v, bias, slopes):
        return sigmoid_attn_func(q, k, v, bias=bias, alibi_slopes=slopes, causal=True)

    clean = [q, k, v, bias, slopes.contiguous()]
    return clean, [q, k, v, _strided(bias), slopes], call_alibi, dout, dout, _differences


def _strided_cu_seqlens(case, device, randn, gen):
    """cu_seqlens that are a column of a table."""
    from .. import sigmoid_attn_varlen_func

    lengths = (case.seqlen_q, 0, case.seqlen_k, 5)
    cu = _cumulative(lengths, device)
    q, k, v, dout = (randn(sum(lengths), 4, case.head_dim) for _ in range(4))

    def call(q, k, v, cu):
        return sigmoid_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)

    return [q, k, v, cu], [q, k, v, _strided(cu)], call, dout, dout, _differences


def _kvcache_strided_tables(case, device, randn, gen):
    """A column-major block table and cache lengths that are a column of a table."""
    from .. import sigmoid_attn_with_kvcache

    page, batch, pages = 16, 3, case.seqlen_k // 16 + 1
    k_cache, v_cache = (randn(batch * pages, page, 2, case.head_dim) for _ in range(2))
    table = torch.randperm(batch * pages, generator=gen).to(device=device, dtype=torch.int32).reshape(batch, pages)
    lengths = torch.tensor([1, case.seqlen_k // 2, case.seqlen_k], dtype=torch.int32, device=device)
    q = randn(batch, 1, 8, case.head_dim)

    def call(q, k_cache, v_cache, lengths, table):
        return sigmoid_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, block_table=table)

    clean = [q, k_cache, v_cache, lengths, table]
    return clean, [q, k_cache, v_cache, _strided(lengths), table.t().contiguous().t()], call, None, None, _differences


def _poisoned(t: torch.Tensor, index) -> torch.Tensor:
    """A copy of t with NaN at ``index`` and inf in the last column there."""
    t = t.clone()
    t[index] = math.nan
    t[index][..., -1] = math.inf
    return t


def _top_left_keys_past_the_queries(case, device, randn, gen):
    """SDPA's is_causal with Sk > Sq: keys past Sq are never seen (NaN and inf there)."""
    from .. import scaled_dot_product_sigmoid_attention

    q, k, v, dout = (t.transpose(1, 2) for t in _dense_qkv(case, randn))
    unseen = (slice(None), slice(None), slice(case.seqlen_q, None))

    def call(q, k, v):
        return scaled_dot_product_sigmoid_attention(q, k, v, is_causal=True, enable_gqa=True)

    return [q, k, v], [q, _poisoned(k, unseen), _poisoned(v, unseen)], call, dout, dout, _differences


def _queries_with_no_key(case, device, randn, gen):
    """Bottom-right causal with Sq > Sk: the first Sq - Sk queries see no key (NaN and inf in their queries
    and output gradients)."""
    from .. import sigmoid_attn_func

    q, k, v, dout = _dense_qkv(case, randn)
    blind = (slice(None), slice(0, case.seqlen_q - case.seqlen_k))

    def call(q, k, v):
        return sigmoid_attn_func(q, k, v, causal=True)

    return [q, k, v], [_poisoned(q, blind), k, v], call, dout, _poisoned(dout, blind), _differences


def _window_keys_outside(case, device, randn, gen):
    """A sliding window (9 left, 7 right) leaves the first keys unseen (NaN and inf there)."""
    from .. import sigmoid_attn_func

    q, k, v, dout = _dense_qkv(case, randn)
    unseen = (slice(None), slice(0, case.seqlen_k - case.seqlen_q - 9))

    def call(q, k, v):
        return sigmoid_attn_func(q, k, v, window_size=(9, 7))

    return [q, k, v], [q, _poisoned(k, unseen), _poisoned(v, unseen)], call, dout, dout, _differences


def _packed_neighbour(case, device, randn, gen):
    """Three packed sequences, the middle one all NaN and inf (its queries, keys, values and output
    gradients): the others' outputs and gradients keep their bits."""
    from .. import sigmoid_attn_varlen_func

    lengths = (case.seqlen_q, case.seqlen_k, case.seqlen_q + 5)
    cu = _cumulative(lengths, device)
    q, k, v, dout = (randn(sum(lengths), 4, case.head_dim) for _ in range(4))
    middle = slice(lengths[0], lengths[0] + lengths[1])
    outer = torch.cat([torch.arange(0, lengths[0]), torch.arange(lengths[0] + lengths[1], sum(lengths))]).to(device)

    def call(q, k, v):
        return sigmoid_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)

    def compare(got, want):
        return _differences([t[outer] for t in got], [t[outer] for t in want])

    dirty = [_poisoned(t, middle) for t in (q, k, v)]
    return [q, k, v], dirty, call, dout, _poisoned(dout, middle), compare


def _packed_neighbour_forward(case, device, randn, gen):
    """``_packed_neighbour``'s call as inference: the outputs alone."""
    clean, dirty, call, _, _, compare = _packed_neighbour(case, device, randn, gen)
    return clean, dirty, call, None, None, compare


def _inf_in_a_query(case, device, randn, gen):
    """An inf in one query whose every score is then +inf: its output stays finite (every weight is 1), and
    no other query's output or dQ changes. Lengths end inside tiles, whose zero padding gave inf x 0 = NaN."""
    from .. import sigmoid_attn_func

    q, k, v, dout = _dense_qkv(case, randn)
    k[..., 0] = k[..., 0].abs() + 0.5
    dirty_q = q.clone()
    dirty_q[0, 5, 1, 0] = math.inf
    others = torch.ones(q.shape[1:3], dtype=torch.bool, device=device)
    others[5, 1] = False

    def call(q, k, v):
        return sigmoid_attn_func(q, k, v)

    def compare(got, want):
        # dK and dV of that query's kv head change with it (and dK is inf x 0 = NaN in its column 0).
        expected = v[0, :, 0].float().sum(dim=0)  # its weights are all 1: the sum of the values
        close = torch.allclose(got[0][0, 5, 1].float(), expected, rtol=0.02, atol=0.05 * expected.abs().max().item())
        found = _differences([got[0][0][others], got[1][0][others]], [want[0][0][others], want[1][0][others]])
        return found + ([] if close else ["the inf query's output is not the sum of the values"])

    return [q, k, v], [dirty_q, k, v], call, dout, dout, compare


def _kvcache_unused_pages(case, device, randn, gen):
    """NaN and inf in every cache slot past a row's length and in every page no row uses."""
    from .. import sigmoid_attn_with_kvcache

    page, batch, pages = 16, 3, case.seqlen_k // 16 + 1
    k_cache, v_cache = (randn(batch * pages + 3, page, 2, case.head_dim) for _ in range(2))
    table = torch.arange(batch * pages, device=device, dtype=torch.int32).reshape(batch, pages)
    lengths = torch.tensor([1, case.seqlen_k // 2, case.seqlen_k], dtype=torch.int32, device=device)
    q = randn(batch, 3, 8, case.head_dim)
    dirty = [k_cache.clone(), v_cache.clone()]
    _poison_unused_slots(*dirty, lengths, table)
    for cache in dirty:
        cache[batch * pages :] = math.inf

    def call(q, k_cache, v_cache):
        return sigmoid_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, block_table=table, causal=True)

    return [q, k_cache, v_cache], [q, *dirty], call, None, None, _differences


ROBUSTNESS_CHECKS = {
    "strided-bias-alibi": _strided_bias_alibi,
    "strided-cu-seqlens": _strided_cu_seqlens,
    "kvcache-strided-tables": _kvcache_strided_tables,
    "topleft-unseen-keys": _top_left_keys_past_the_queries,
    "queries-with-no-key": _queries_with_no_key,
    "window-unseen-keys": _window_keys_outside,
    "packed-nan-neighbour-forward": _packed_neighbour_forward,
    "packed-nan-neighbour": _packed_neighbour,
    "inf-query": _inf_in_a_query,
    "kvcache-unused-pages": _kvcache_unused_pages,
}


# Lengths per check: queries with no key need Sq > Sk, unseen keys Sk > Sq (by more than the window's 9).
_ROBUSTNESS_LENGTHS = {
    "queries-with-no-key": (1100, 700),
    "topleft-unseen-keys": (700, 1100),
    "window-unseen-keys": (700, 1100),
}


def robustness_grid(quick: bool) -> list[RobustnessCase]:
    """Every check at head dims the sm_90 kernels take (64, 128) and one they do not (96; 16 and 24 on the
    CPU), with lengths that end inside tiles (scaled down 20-fold on the CPU)."""
    shapes = [(d, "bfloat16") for d in (16, 24)] if quick else [(64, "bfloat16"), (128, "float16"), (96, "bfloat16")]
    cases = []
    for name in ROBUSTNESS_CHECKS:
        sq, sk = _ROBUSTNESS_LENGTHS.get(name, (1000, 1001))
        if quick:
            sq, sk = sq // 20 + 1, sk // 20
        cases += [RobustnessCase(name, d, sq, sk, dt) for d, dt in shapes]
    return cases


def grid(quick: bool) -> list[AnyCase]:
    """Odd lengths, Sq != Sk, every head dim, both dtypes, all masks, GQA/MQA, ALiBi, per-head bias; packed
    sequences (empty ones included); KV caches contiguous and paged, decode and chunked prefill, empty
    rows, with and without GQA packing and key splits."""
    masks = [
        dict(),
        dict(causal=True),
        dict(window=(64, 32)),
        dict(causal=True, window=(100, -1)),
        dict(window=(-1, 40)),
        dict(window=(300, -1)),
        dict(causal=True, top_left=True),
        # Sq > Sk: the last rows' windows start past every key
        dict(causal=True, window=(50, -1), top_left=True),
        dict(alibi=True, causal=True),
        dict(alibi=True),
        dict(alibi=True, window=(64, 32)),
        dict(head_bias=True),
        dict(causal=True, dropout=0.2),
    ]
    varlen_masks = [m for m in masks if not m.get("top_left")]
    if quick:
        shapes = [(1, 1), (17, 17), (113, 203), (203, 113)]
        cases = [Case(2, sq, sk, 4, 2, 32, **m) for (sq, sk), m in itertools.product(shapes, masks)]
        cases += [Case(1, 40, 37, 2, 1, d, dtype=dt) for d in (16, 24, 64) for dt in ("bfloat16", "float16")]
        cases += [VarlenCase((5, 0, 40, 17), (7, 3, 33, 17), 4, 2, 32, **m) for m in varlen_masks]
        cases += [
            KVCacheCase((0, 13, 50), 1, 64, 8, 2, 32, page_size=page, num_splits=splits, pack_gqa=pack)
            for page, splits, pack in itertools.product((0, 16), (1, 3), (False, True))
        ]
        cases += [
            KVCacheCase((5, 30), 7, 48, 4, 1, 24, dtype="float16", window=(9, -1), alibi=True, head_bias=True),
            KVCacheCase((0, 20), 3, 32, 6, 2, 32, causal=False, page_size=16),  # group 3: not packed
            KVCacheCase((3, 40), 2, 48, 4, 2, 32, page_size=8, num_splits=2),  # a page per key, not per tile
        ]
        # deterministic: the backward three times, bit-identical
        cases += [Case(2, 113, 203, 4, 2, 32, deterministic=True, **m) for m in (dict(), dict(causal=True))]
        cases += [VarlenCase((5, 0, 40, 17), (7, 3, 33, 17), 4, 2, 32, causal=True, deterministic=True)]
        # A value head dim of its own, wider and narrower than the query's (and padded: 24, 48)
        cases += [
            Case(2, 113, 203, 4, 2, 48, head_dim_v=24, causal=True),
            Case(1, 40, 37, 2, 1, 16, head_dim_v=32, dtype="float16", window=(9, 3), head_bias=True),
            VarlenCase((5, 0, 40, 17), (7, 3, 33, 17), 4, 2, 32, head_dim_v=16, causal=True, alibi=True),
            KVCacheCase((0, 13, 50), 1, 64, 8, 2, 32, head_dim_v=48, page_size=16, num_splits=3, pack_gqa=True),
        ]
        return cases
    shapes = [(1, 1), (17, 17), (113, 203), (203, 113), (1023, 1023), (1, 1023), (2048, 2048)]
    cases = [
        Case(2, sq, sk, 8, hkv, d, **m)
        for d in (64, 128)
        for (sq, sk), m, hkv in itertools.product(shapes, masks, (8, 2, 1))
        if hkv == 2 or (m == {} and sq == 113) or (m == dict(causal=True) and sq == 1023)
    ]
    for d, dt in itertools.product((8, 16, 32, 40, 64, 80, 96, 128, 192, 256), ("bfloat16", "float16")):
        for (sq, sk), m in itertools.product(((113, 203), (1023, 1023)), (dict(), dict(causal=True))):
            cases.append(Case(2, sq, sk, 4, 2, d, dtype=dt, **m))
    lens_q, lens_k = (1, 0, 513, 77, 1023, 200), (17, 9, 513, 300, 1023, 0)
    cases += [VarlenCase(lens_q, lens_k, 8, 2, d, **m) for d in (64, 128) for m in varlen_masks]
    cases += [VarlenCase(lens_q, lens_k, 8, hkv, d, dtype="float16", causal=True) for d in (96, 256) for hkv in (8, 1)]
    # The Gluon kernels: GQA and fp16; tiles that end exactly at a sequence's end, and a long sequence of
    # many tiles beside short ones.
    cases += [VarlenCase(lens_q, lens_k, 8, 1, d, dtype="float16", causal=c) for d in (64, 128) for c in (False, True)]
    lens = (128, 64, 3000, 1, 256)
    cases += [VarlenCase(lens, lens, 4, 2, d, causal=c) for d in (64, 128) for c in (False, True)]
    caches = (0, 1, 1000, 4097)
    for d, (hq, hkv), page in itertools.product((64, 128, 256), ((32, 8), (32, 32), (8, 1)), (0, 16, 256)):
        cases.append(KVCacheCase(caches, 1, 8192, hq, hkv, d, page_size=page))
    for splits, pack in itertools.product((1, 4, 32), (False, True)):
        cases.append(KVCacheCase(caches, 1, 8192, 32, 8, 128, num_splits=splits, pack_gqa=pack))
    cases += [
        KVCacheCase(caches, 64, 8192, 32, 8, 128, page_size=256),  # chunked prefill
        KVCacheCase(caches, 113, 8192, 16, 4, 128, dtype="float16", window=(300, -1), alibi=True, head_bias=True),
        KVCacheCase(caches, 3, 8192, 12, 4, 80, causal=False, page_size=16),  # group 3: not packed
    ]
    # 40 rows: 320 or 1280 programs, the wide tiles of KVCACHE_MANY_PROGRAMS_CONFIGS on an H100 or H200, and
    # for a 2k cache KVCACHE_SHORT_MANY_PROGRAMS_CONFIGS'
    cases += [KVCacheCase(tuple(range(0, 4040, 101)), 1, 4096, 32, hkv, 128) for hkv in (8, 32)]
    cases += [KVCacheCase(tuple(range(0, 2040, 51)), 1, 2048, 32, hkv, 128) for hkv in (8, 32)]
    # A value head dim of its own: DeepSeek's 192/128 (MLA's training shapes), its reverse and small ones
    for (d, dv), dt in itertools.product(((192, 128), (128, 192), (64, 32), (96, 64)), ("bfloat16", "float16")):
        for (sq, sk), m in itertools.product(((113, 203), (1023, 1023)), (dict(), dict(causal=True))):
            cases.append(Case(2, sq, sk, 8, 2, d, head_dim_v=dv, dtype=dt, **m))
    cases += [VarlenCase(lens_q, lens_k, 8, 2, 192, head_dim_v=128, causal=True, alibi=True)]
    cases += [KVCacheCase(caches, 1, 8192, 32, 8, 192, head_dim_v=128, page_size=page) for page in (0, 16)]
    # deterministic=True: the deterministic backward at every mask, GQA, the per-head bias, packed sequences and
    # a head dim the Gluon kernels do not take (96); each case's gradients bit-identical over three runs
    cases += [Case(1, 2048, 2048, 8, hkv, 128, deterministic=True, causal=True) for hkv in (8, 1)]
    cases += [VarlenCase(lens, lens, 4, 2, d, causal=c, deterministic=True) for d in (64, 128) for c in (False, True)]
    cases += [Case(2, 1023, 1023, 4, 2, 96, deterministic=True, causal=True)]
    det_masks = [m for m in masks if not m.get("dropout")]
    for (sq, sk), m, d in itertools.product(((1023, 1023), (203, 2048)), det_masks, (64, 128)):
        cases.append(Case(2, sq, sk, 8, 2, d, deterministic=True, **m))
    return list(dict.fromkeys(cases))


def shard(text: str) -> tuple[int, int]:
    """``K/N`` as (K, N), 0 <= K < N; otherwise a usage error that says what was expected."""
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N, got {text!r}")
    return int(k), int(n)


def main(argv: list[str] | None = None) -> int:
    """Runs the grid (the small one on the CPU, in Triton's interpreter); returns 1 if a case failed."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small grid (the CPU default)")
    parser.add_argument("--json", metavar="PATH", help="write {meta, rows} here")
    parser.add_argument("--filter", metavar="REGEX", help="run only the cases whose id matches")
    parser.add_argument(
        "--shard",
        metavar="K/N",
        type=shard,
        default=(0, 1),
        help="run every N-th case from the K-th (0 <= K < N), so N device calls of bounded length cover the grid",
    )
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when it is imported, and importing sigattn (torch.compile's
        # machinery) already imported it: start again with the variable set.
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", MODULE, *argv])
    quick = args.quick or device == "cpu"
    rows, meta = [], run_meta(" ".join([f"python -m {MODULE}", *argv]))
    cases = [c for c in grid(quick) + robustness_grid(quick) if args.filter is None or re.search(args.filter, c.id)]
    cases = cases[args.shard[0] :: args.shard[1]]
    for case in cases:
        row = run_case(case, device)
        rows.append(row)
        names = [k[: -len("_err")] for k in row if k.endswith("_err") and not k.endswith("_pt_err")]
        errs = " ".join(f"{n}={row[n + '_err']:.1e}/{row[n + '_pt_err']:.1e}" for n in names)
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {case.id:60s} {errs} {row.get('detail', '')}", flush=True)
        if args.json:  # after every case, so a run cut short still leaves its record
            write_json(args.json, meta, rows)
    failed = [r["id"] for r in rows if not r["ok"]]
    forwards, backwards = (sum(r.get(f"{p}_kernel") == "gluon-sm90" for r in rows) for p in ("forward", "backward"))
    print(
        f"{len(rows) - len(failed)} passed, {len(failed)} failed ({forwards} dense forwards and {backwards} "
        "backwards on the sm_90 kernels)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
