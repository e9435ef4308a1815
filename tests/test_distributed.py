"""Context parallelism (``sigattn.distributed``) on the CPU with gloo, across 2 and 4 processes.

Every case builds one full sequence (the same on every rank, from a fixed seed), shards it, runs ring or
Ulysses attention on the shards, and compares this rank's output and gradients with the same shard of the
float64 reference on the full sequence: 1e-10 in float64, the tolerance rule in float32 and bfloat16
(conftest.py). The per-head bias gradient is summed over the group first (see ``ring_sigmoid_attn``).
``bias=None`` cases fail if the default bias used the local shard's length instead of the whole
sequence's. The cases cover odd shard lengths, empty shards, GQA and MQA (Ulysses repeating K/V heads),
both layouts, subgroups of the world (P2P peers are global ranks), and the Triton kernels' launchers in
Triton's interpreter (bfloat16; the auto backend on the CPU is the PyTorch one).

Spawning processes is slow, so one group per world size runs every case and reports, per case id, the
first error of each rank; each case is then its own pytest test. Pure helpers (shard layouts, the ring's
per-step pieces, head repeats) are tested in-process. The last test runs the GPU check script,
``sigattn.testing.distributed``, under torchrun on 2 CPU processes (its quick grid).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_within_tolerance_rule

from sigattn import sigmoid_attn_func, use_backend
from sigattn.distributed import ring as ring_module
from sigattn.distributed import (
    ring_sigmoid_attn,
    shard_positions,
    shard_sequence,
    ulysses_sigmoid_attn,
    unshard_sequence,
)
from sigattn.distributed.ring import ring_step_pieces
from sigattn.distributed.ulysses import kv_head_repeats
from sigattn.ops.sigmoid_attn.reference import sigmoid_attn_reference
from sigattn.testing.distributed import full_inputs

METHODS = {"ring": ring_sigmoid_attn, "ulysses": ulysses_sigmoid_attn}
# The Triton cases run the kernels on CPU tensors, in Triton's interpreter (conftest sets it without a GPU).
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class DistCase:
    world_size: int
    method: str  # a key of METHODS
    batch: int
    seqlen_local: int
    heads: int
    kv_heads: int
    headdim: int
    causal: bool = False
    load_balance: bool = False
    bias: str = "default"  # "default" (None: -log of the whole sequence's length), "float" or "tensor"
    dtype: str = "fp64"
    backend: str | None = None  # forced with use_backend; None: auto (the "torch" backend on the CPU)
    group_size: int | None = None  # the world split into groups of this size, one sequence each; None: one

    @property
    def seqlen(self) -> int:
        """The whole sequence's length, which one group of ranks shares."""
        return self.cp_size * self.seqlen_local

    @property
    def cp_size(self) -> int:
        """The number of ranks sharing one sequence."""
        return self.group_size or self.world_size

    @property
    def id(self) -> str:
        groups = f"-groups{self.group_size}" if self.group_size else ""
        parts = [
            f"N{self.world_size}{groups}-{self.method}-B{self.batch}-S{self.seqlen_local}x{self.cp_size}"
            f"-H{self.heads}-Hkv{self.kv_heads}-D{self.headdim}"
        ]
        parts += ["causal"] if self.causal else []
        parts += ["zigzag"] if self.load_balance else []
        parts += [f"bias{self.bias}"] if self.bias != "default" else []
        parts += [self.backend] if self.backend else []
        return "-".join([*parts, self.dtype])


def _cases(world_size: int) -> list[DistCase]:
    n = world_size
    table = []
    for method in METHODS:
        table += [
            DistCase(n, method, 2, 17, 4, 4, 16),
            DistCase(n, method, 2, 17, 4, 2, 16, causal=True),
            DistCase(n, method, 1, 18, 4, 1, 8, causal=True, load_balance=True, bias="tensor"),  # MQA
            DistCase(n, method, 2, 10, 8, 2, 16, load_balance=True, bias="float"),
            DistCase(n, method, 1, 6, 4, 2, 16, causal=True, load_balance=True, dtype="fp32"),
        ]
    table += [
        DistCase(n, "ring", 1, 1, 2, 1, 8, causal=True),  # one token per rank
        DistCase(n, "ring", 1, 0, 2, 1, 8, causal=True),  # empty shards
        DistCase(n, "ulysses", 1, 0, 2 * n, 1, 8),
        DistCase(n, "ring", 1, 2, 3, 3, 8, causal=True, load_balance=True, bias="tensor"),  # one per chunk
        DistCase(n, "ulysses", 1, 5, 2 * n, n, 8, causal=True, bias="tensor"),  # no repeat needed
    ]
    if n == 4:  # two groups of two ranks, each with its own sequence: ranks within a subgroup
        table += [
            DistCase(n, "ring", 1, 6, 2, 1, 8, causal=True, load_balance=True, bias="tensor", group_size=2),
            DistCase(n, "ulysses", 1, 6, 2, 1, 8, causal=True, load_balance=True, bias="tensor", group_size=2),
        ]
    if n == 2:  # the Triton kernels' launchers, in Triton's interpreter (slow: tiny shapes)
        table += [
            DistCase(
                n, "ring", 1, 8, 2, 1, 16, causal=True, load_balance=True, bias="tensor", dtype="bf16", backend="triton"
            ),
            DistCase(n, "ring", 1, 5, 2, 2, 16, dtype="bf16", backend="triton"),
            DistCase(n, "ulysses", 1, 8, 2, 1, 16, causal=True, load_balance=True, dtype="bf16", backend="triton"),
        ]
    return table


CASES = {n: _cases(n) for n in (2, 4)}
ALL_CASES = [c for cases in CASES.values() for c in cases]


def _grad_names(args: dict) -> list[str]:
    return ["q", "k", "v"] + (["bias"] if isinstance(args["bias"], torch.Tensor) else [])


def _reference(args: dict, causal: bool, dtype: torch.dtype, upcast: bool):
    """Output and gradients of <out, dout> on the full sequence, single process."""
    leaves = {n: args[n].to(dtype, copy=True).requires_grad_() for n in _grad_names(args)}
    bias = leaves.get("bias", args["bias"])
    out = sigmoid_attn_reference(leaves["q"], leaves["k"], leaves["v"], bias=bias, causal=causal, upcast=upcast)
    grads = torch.autograd.grad(out, list(leaves.values()), args["dout"].to(out.dtype))
    return out.detach(), dict(zip(leaves, grads, strict=True))


def run_case(case: DistCase, group: dist.ProcessGroup | None) -> None:
    """Runs one case on this rank of ``group`` (None: the world); raises AssertionError if its shards
    disagree with the reference.

    Every rank makes the same collective calls whatever it finds, so a failure on one rank cannot hang
    the others: comparisons come after all communication."""
    args = full_inputs(case, torch.device("cpu"))  # the same on every rank: a fixed seed
    dtype = DTYPES[case.dtype]
    n, lb, rank = case.cp_size, case.load_balance, dist.get_rank(group)

    def shard(t):
        return shard_sequence(t, n, rank, load_balance=lb)

    local = {name: shard(args[name]).to(dtype, copy=True).requires_grad_() for name in ("q", "k", "v")}
    if isinstance(args["bias"], torch.Tensor):
        local["bias"] = args["bias"].to(dtype, copy=True).requires_grad_()  # replicated, like a model weight
    bias = local.get("bias", args["bias"])
    with use_backend(case.backend or "auto"):
        out = METHODS[case.method](
            local["q"], local["k"], local["v"], group, causal=case.causal, bias=bias, load_balance=lb
        )
        grads = torch.autograd.grad(out, list(local.values()), shard(args["dout"]).to(dtype))
    grads = dict(zip(local, grads, strict=True))
    if "bias" in grads:  # each rank holds its share of the replicated bias's gradient: sum over the group
        total = grads["bias"].double()  # gloo reduces no bfloat16
        dist.all_reduce(total, group=group)
        grads["bias"] = total.to(dtype)

    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    truth, truth_grads = _reference(args, case.causal, torch.float64, upcast=True)
    got = {"out": out, **grads}
    want = {"out": shard(truth), **{n: g if n == "bias" else shard(g) for n, g in truth_grads.items()}}
    if dtype == torch.float64:
        for name, value in got.items():
            torch.testing.assert_close(value, want[name], atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
        return
    baseline, base_grads = _reference(args, case.causal, dtype, upcast=False)
    base = {"out": shard(baseline), **{n: g if n == "bias" else shard(g) for n, g in base_grads.items()}}
    for name, value in got.items():
        assert_within_tolerance_rule(name, value, want[name], base[name], dtype)


# ------------------------------------------------------------------------------ bad inputs, on every rank


def _t(*shape):
    return torch.randn(shape, dtype=torch.float64)


def _seqlen_differs(rank, n):
    s = 17 if rank == 0 else 16
    return ring_sigmoid_attn(_t(1, s, 2, 8), _t(1, s, 2, 8), _t(1, s, 2, 8))


def _zigzag_odd_on_rank0(rank, n):
    s = 5 if rank == 0 else 4
    return ring_sigmoid_attn(_t(1, s, 2, 8), _t(1, s, 2, 8), _t(1, s, 2, 8), causal=True, load_balance=True)


def _causal_differs(rank, n):
    return ulysses_sigmoid_attn(_t(1, 4, n, 8), _t(1, 4, n, 8), _t(1, 4, n, 8), causal=rank == 0)


# (id, call(rank, world_size), exception, regex the message must match)
BAD_INPUTS = [
    ("seqlen-differs", _seqlen_differs, ValueError, r"same local sequence length .*\[17, 16"),
    ("causal-differs", _causal_differs, ValueError, r"same causal flag, got \[True, False"),
    (
        "ulysses-heads-not-divisible",
        lambda rank, n: ulysses_sigmoid_attn(_t(1, 4, n + 1, 8), _t(1, 4, 1, 8), _t(1, 4, 1, 8)),
        ValueError,
        r"number of query heads \(q's dim 2 = \d+\) must be a multiple of the group size",
    ),
    (
        "zigzag-odd-length",
        lambda rank, n: ring_sigmoid_attn(_t(1, 5, 2, 8), _t(1, 5, 2, 8), _t(1, 5, 2, 8), load_balance=True),
        ValueError,
        r"local sequence length \(q's dim 1\) must be even, got 5",
    ),
    (
        "k-length",
        lambda rank, n: ring_sigmoid_attn(_t(1, 4, 2, 8), _t(1, 5, 2, 8), _t(1, 5, 2, 8)),
        ValueError,
        r"k must have the local sequence length of q \(4\)",
    ),
    (
        "value-head-dim",
        lambda rank, n: ulysses_sigmoid_attn(_t(1, 4, n, 8), _t(1, 4, n, 8), _t(1, 4, n, 4)),
        ValueError,
        r"ulysses_sigmoid_attn needs v's head dim to be q's and k's \(8\).*got v of shape \(1, 4, \d+, 4\)",
    ),
    (
        "bias-shape",
        lambda rank, n: ring_sigmoid_attn(_t(1, 4, 2, 8), _t(1, 4, 2, 8), _t(1, 4, 2, 8), bias=_t(3)),
        ValueError,
        r"bias must be a float or a tensor of shape \(Hq,\) = \(2,\)",
    ),
    (  # rank 0 fails a local check; the others, waiting in the cross-rank check, must raise too, not hang
        "zigzag-odd-length-on-one-rank",
        _zigzag_odd_on_rank0,
        ValueError,
        r"must be even, got 5|the arguments of rank\(s\) \[0\] of the group failed their checks",
    ),
]


def _expect_error(call, rank, n, exception, pattern) -> None:
    try:
        call(rank, n)
    except exception as error:
        assert re.search(pattern, str(error)), f"message {str(error)!r} does not match {pattern!r}"
        return
    raise AssertionError(f"no {exception.__name__} raised")


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # CI has 2 cores for up to 4 processes
    # A bug that leaves a rank waiting fails the case after this long instead of hanging the suite.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    groups = {None: None}
    for c in CASES[world_size]:
        if c.group_size and c.group_size not in groups:  # every rank creates every group, in one order
            for first in range(0, world_size, c.group_size):
                members = list(range(first, first + c.group_size))
                group = dist.new_group(members)
                if rank in members:
                    groups[c.group_size] = group
    errors = {}
    cases = [c for c in CASES[world_size] if c.backend != "triton" or TRITON_ON_CPU]
    jobs = [(c.id, lambda c=c: run_case(c, groups[c.group_size])) for c in cases]
    jobs += [
        (f"N{world_size}-{name}", lambda call=call, e=e, p=p: _expect_error(call, rank, world_size, e, p))
        for name, call, e, p in BAD_INPUTS
    ]
    for case_id, job in jobs:
        try:
            job()
            errors[case_id] = None
        except Exception as error:  # recorded per case; the parent test reports it
            errors[case_id] = "".join(traceback.format_exception_only(type(error), error)).strip()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(errors, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """world_size -> {case id: None, or the errors of the ranks where it failed}; one spawn per world size."""
    cache = {}

    def get(world_size: int) -> dict[str, str | None]:
        if world_size not in cache:
            out_dir = tmp_path_factory.mktemp(f"gloo{world_size}")
            mp.spawn(_worker, args=(world_size, str(out_dir / "store"), str(out_dir)), nprocs=world_size)
            per_rank = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]
            cache[world_size] = {
                case_id: "; ".join(f"rank {r}: {e[case_id]}" for r, e in enumerate(per_rank) if e[case_id]) or None
                for case_id in per_rank[0]
            }
        return cache[world_size]

    return get


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_context_parallel_matches_single_process(group_results, case):
    if case.backend == "triton" and not TRITON_ON_CPU:
        pytest.skip("needs triton and TRITON_INTERPRET=1 (conftest sets it on machines without a GPU)")
    error = group_results(case.world_size)[case.id]
    assert error is None, error


@pytest.mark.parametrize("world_size", [2, 4], ids=["N2", "N4"])
@pytest.mark.parametrize("name", [b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_on_every_rank(group_results, world_size, name):
    error = group_results(world_size)[f"N{world_size}-{name}"]
    assert error is None, error


# ------------------------------------------------------------------------------ in-process: pure helpers


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_sigmoid_attn(_t(1, 4, 2, 8), _t(1, 4, 2, 8), _t(1, 4, 2, 8))


def test_zigzag_layout_is_the_documented_one():
    x = torch.arange(16)[None]  # (1, S)
    shards = [shard_sequence(x, 4, r, load_balance=True).tolist()[0] for r in range(4)]
    assert shards == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    assert [shard_sequence(x[:, :8], 4, r).tolist()[0] for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("load_balance", [False, True], ids=["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_positions_and_unshard_invert_shard(world_size, load_balance):
    x = torch.randn(2, 12 * world_size, 3)
    shards = [shard_sequence(x, world_size, r, load_balance=load_balance) for r in range(world_size)]
    assert torch.equal(unshard_sequence(shards, load_balance=load_balance), x)
    for r, s in enumerate(shards):
        positions = shard_positions(x.shape[1], world_size, r, load_balance=load_balance)
        assert torch.equal(s, x[:, positions])


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: shard_sequence(torch.zeros(1, 10), 4, 0), r"sequence length \(10\) must be a multiple of 4"),
        (lambda: shard_sequence(torch.zeros(1, 12), 4, 0, load_balance=True), r"multiple of 8, zig-zag"),
        (lambda: shard_positions(8, 2, 2), r"rank must be in \[0, world_size = 2\)"),
        (lambda: unshard_sequence([torch.zeros(1, 3)] * 2, load_balance=True), r"length must be even, got 3"),
        (lambda: shard_sequence(torch.zeros(1, 8), 0, 0), r"world_size must be at least 1, got 0"),
        (lambda: shard_positions(-4, 2, 0), r"seqlen must be >= 0, got -4"),
    ],
    ids=[
        "contiguous-indivisible",
        "zigzag-indivisible",
        "rank-out-of-range",
        "unshard-odd-zigzag",
        "no-ranks",
        "negative-length",
    ],
)
def test_sharding_errors(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: shard_sequence(torch.zeros(1, 8), 2, True), r"rank must be an int, got bool True"),
        (lambda: shard_sequence(torch.zeros(1, 8), 2.0, 0), r"world_size must be an int, got float 2.0"),
        (lambda: shard_positions(8, 2, 0, load_balance=None), r"load_balance must be a bool, got NoneType None"),
    ],
    ids=["bool-rank", "float-world-size", "none-load-balance"],
)
def test_sharding_type_errors(call, pattern):
    with pytest.raises(TypeError, match=pattern):
        call()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("load_balance", [False, True], ids=["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_steps_cover_every_allowed_pair_once(world_size, load_balance, causal):
    """Over all ranks and steps, the pieces (with their masks) compute each allowed (query, key) pair of
    the whole sequence exactly once, and no other; with zig-zag every rank computes the same number."""
    local = 6
    seqlen = world_size * local
    count = torch.zeros(seqlen, seqlen, dtype=torch.int64)
    work = []
    for rank in range(world_size):
        q_pos = shard_positions(seqlen, world_size, rank, load_balance=load_balance)
        pairs = 0
        for src in range(world_size):
            k_pos = shard_positions(seqlen, world_size, src, load_balance=load_balance)
            for p in ring_step_pieces(rank, src, local, causal=causal, load_balance=load_balance):
                rows, cols = q_pos[p.q_rows], k_pos[p.k_rows]
                allowed = torch.ones(len(rows), len(cols), dtype=torch.int64)
                if p.causal:
                    assert torch.equal(rows, cols)
                    allowed = allowed.tril()
                count[rows[:, None], cols[None, :]] += allowed
                pairs += int(allowed.sum())
        work.append(pairs)
    expected = torch.ones(seqlen, seqlen, dtype=torch.int64)
    assert torch.equal(count, expected.tril() if causal else expected)
    if load_balance or not causal:
        assert len(set(work)) == 1, f"pairs per rank {work}"


def test_ring_backward_runs_on_the_forwards_backend(tmp_path, monkeypatch):
    """The backward's pieces run on the backend the forward chose, not on whatever is forced where the
    backward runs: after the caller's use_backend block, or, on CUDA, on the autograd engine's thread, which
    that block does not reach. One process (a group of one): the ring's autograd without communication."""
    ran = []

    class Spy:
        def __init__(self, backend):
            self.backend, self.name = backend, backend.name

        def __call__(self, call):
            ran.append(self.name)
            return self.backend(call)

    select = ring_module.select_backend
    monkeypatch.setattr(ring_module, "select_backend", lambda call: Spy(select(call)))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        q, k, v = (_t(1, 4, 2, 8).requires_grad_() for _ in range(3))
        with use_backend("reference"):
            out = ring_sigmoid_attn(q, k, v, causal=True)
        ran.clear()
        out.sum().backward()
    finally:
        dist.destroy_process_group()
    assert ran == ["reference"]


def test_double_backward_differentiates_ulysses_and_the_ring_refuses_it(tmp_path):
    """create_graph=True (a gradient penalty): Ulysses' all-to-alls are linear and differentiate twice, so on
    the torch backend its second-order gradients equal single-process attention's; the ring's backward has no
    derivative and says so instead of returning gradients cut from the graph. One process (a group of one)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        q, k, v = (_t(1, 6, 2, 8).requires_grad_() for _ in range(3))

        def penalty_grad(attention):
            (grad_q,) = torch.autograd.grad(attention(q, k, v, causal=True).square().sum(), q, create_graph=True)
            return torch.autograd.grad(grad_q.square().sum(), (k, v))

        with use_backend("torch"):
            expected = penalty_grad(sigmoid_attn_func)
            got = penalty_grad(ulysses_sigmoid_attn)
            (grad_q,) = torch.autograd.grad(ring_sigmoid_attn(q, k, v).square().sum(), q, create_graph=True)
            with pytest.raises(RuntimeError, match="differentiate twice"):
                grad_q.square().sum().backward()
    finally:
        dist.destroy_process_group()
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "heads, kv_heads, world_size, repeats",
    [(8, 8, 4, 1), (8, 2, 2, 1), (8, 2, 4, 2), (8, 1, 8, 8), (12, 3, 4, 4), (12, 6, 4, 2), (16, 4, 8, 2)],
)
def test_kv_head_repeats(heads, kv_heads, world_size, repeats):
    assert kv_head_repeats(heads, kv_heads, world_size) == repeats


# ------------------------------------------------------------------------------ the torchrun check script


def test_check_script_under_torchrun(tmp_path):
    """``sigattn.testing.distributed`` (the GPU grid's script) on the CPU: 2 gloo processes under
    torchrun, the quick grid; it exits 0 and records every case on both ranks."""
    path = tmp_path / "check.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "sigattn.testing.distributed",
        "--device",
        "cpu",
        "--quick",
        "--json",
        str(path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # CI has 2 cores
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    record = json.loads(path.read_text())
    assert record["meta"]["world_size"] == 2 and record["meta"]["backend"] == "gloo"
    assert record["rows"] and record["summary"]["failed"] == 0
    for row in record["rows"]:
        assert row["passed"] and [r["rank"] for r in row["per_rank"]] == [0, 1], row["id"]
