"""Correctness grid of context parallelism (ring and Ulysses attention) on N GPUs, one process per GPU.

    torchrun --standalone --nproc-per-node N -m sigattn.testing.distributed \\
        --json benchmarks/results/check_context_parallel_<gpu>x<N>_<date>.json
    torchrun --standalone --nproc-per-node 2 -m sigattn.testing.distributed --device cpu   # gloo, small grid

The GPU counterpart of tests/test_distributed.py. Every case builds the same full-sequence inputs on every
rank (a fixed seed), shards them with ``shard_sequence``, runs ``ring_sigmoid_attn`` or
``ulysses_sigmoid_attn`` forward and backward (``torch.autograd.grad`` with a fixed random output
gradient), sums the per-head bias gradient over the group, and compares this rank's output and gradients
with the same shard of

* the float64 reference on the full sequence, by flash-attn's rule (``sigattn.testing.tolerance``, its
  ``sharded_term``): for the output and every gradient, ``max|ours - truth| <= 2 * max|PyTorch in the same
  dtype - truth| + eps(dtype) * max|truth|`` in bf16 and fp16; in float32 and float64 (the CPU grid) the
  last term is the CPU tests' 1e-5 and 1e-10 instead (no final rounding there, only another order of
  summation). This decides ``passed``.
* the single-device ``sigmoid_attn_func`` on the full sequence on this rank: the largest absolute
  difference, and whether it is within the same rule. Informational.

On CUDA every case forces the Triton backend (``use_backend("triton")``, "triton" in the case ids), for
the method's local attention and for ``sigmoid_attn_func``: auto would fall back to the PyTorch backend
with only a warning, and the kernels would go untested.

The grid adapts to N = 1 .. 8: query heads are a multiple of N (Ulysses splits them), odd local lengths
use the contiguous layout, zig-zag (``load_balance=True``) even ones; causal and full masks, GQA and MQA,
bias None / float / per-head tensor; on CUDA bf16 and fp16 with head dims 64 and 128 and local lengths
1, 17, 113 and 1024; on the CPU (``--device cpu``, gloo) float64 and float32 on the default backend, and
under ``TRITON_INTERPRET=1`` also bf16 with ``use_backend("triton")`` (the kernels in Triton's
interpreter; tiny). ``--quick`` runs a few small cases.

A rank that fails before or after the group's collectives (building inputs, the reference, out of memory)
is recorded and the others go on: the ranks agree on failures before each collective, and compare only
after the last one. A failure inside ring or Ulysses's own communication leaves the other ranks waiting
until the process group's ``--timeout``.

JSON (rank 0 writes it after every case, so a run cut short keeps its record): ``{"meta": {device,
torch, triton, python, cuda, date, command, git_commit, nccl, world_size, backend}, "rows": [{"id",
"method", "world_size", "batch", "seqlen_local", "seqlen", "heads", "kv_heads", "headdim", "causal",
"load_balance", "bias", "dtype", "kernel_backend", "passed", "vs_single_within_rule", "per_rank": [{"rank",
"errors", "pytorch_errors", "tolerances", "vs_single", "single_errors", "vs_single_within_rule",
"failures"}]}], "summary": {"passed", "failed", "failed_ids"}}``; errors are max absolute errors per
result (out, dq, dk, dv, dbias). Exits 1 if any case failed.

NVLink multicast (NVLS) stays off, as the lender's machines require: NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set unless the environment sets them.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from .. import sigmoid_attn_func, use_backend
from ..distributed import ring_sigmoid_attn, shard_sequence, ulysses_sigmoid_attn
from ..ops.sigmoid_attn.reference import sigmoid_attn_reference
from ..runinfo import run_meta, write_json
from .tolerance import allowed_error, max_error, sharded_term

METHODS = {"ring": ring_sigmoid_attn, "ulysses": ulysses_sigmoid_attn}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODULE = "sigattn.testing.distributed"  # torchrun ... -m MODULE runs the grid
NCCL_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class DistCase:
    method: str  # a key of METHODS
    world_size: int
    batch: int
    seqlen_local: int
    heads: int
    kv_heads: int
    headdim: int
    causal: bool = False
    load_balance: bool = False
    bias: str = "default"  # "default" (None: -log of the whole sequence's length), "float" or "tensor"
    dtype: str = "bf16"
    backend: str | None = None  # forced with use_backend; None: auto (the PyTorch backend on the CPU)

    @property
    def seqlen(self) -> int:
        return self.world_size * self.seqlen_local

    @property
    def id(self) -> str:
        parts = [
            f"N{self.world_size}-{self.method}-B{self.batch}-S{self.seqlen_local}x{self.world_size}"
            f"-H{self.heads}-Hkv{self.kv_heads}-D{self.headdim}"
        ]
        parts += ["causal"] * self.causal + ["zigzag"] * self.load_balance
        parts += [f"bias{self.bias}"] * (self.bias != "default") + [self.backend] * (self.backend is not None)
        return "-".join([*parts, self.dtype])


# ------------------------------------------------------------------------------------------------ the grid


def default_heads(world_size: int) -> int:
    """At least 4 query heads, a multiple of the world size (Ulysses splits them) and even (so that
    heads // 2 is a GQA layout): 4 4 6 4 10 6 14 8 for N = 1 .. 8."""
    heads = world_size * math.ceil(4 / world_size)
    return heads if heads % 2 == 0 else 2 * heads


def grid(world_size: int, device: str, quick: bool, triton_on_cpu: bool = False) -> list[DistCase]:
    """A base sweep (both methods x local lengths and layouts x causal/full, GQA, default bias) and, at one
    contiguous odd length and one zig-zag length, one change at a time: dtype, head dim, MHA, MQA, float and
    per-head bias, and all of them together."""
    n, heads = world_size, default_heads(world_size)
    gpu = device == "cuda"
    dtypes = ("bf16", "fp16") if gpu else ("fp64", "fp32")
    headdims = (128, 64) if gpu else (16, 8)
    # On CUDA the Triton kernels, forced: auto would fall back to the PyTorch backend with only a warning.
    base = dict(
        heads=heads, kv_heads=heads // 2, headdim=headdims[0], dtype=dtypes[0], backend="triton" if gpu else None
    )
    if gpu:  # odd lengths only contiguous: zig-zag needs two chunks per rank
        layouts = [(1, False), (17, False), (113, False), (1024, False), (2, True), (114, True), (1024, True)]
        variant_layouts = [(113, False), (1024, True)]
    else:
        layouts = [(1, False), (17, False), (2, True), (18, True)]
        variant_layouts = [(17, False), (18, True)]

    def case(method, seqlen_local, load_balance, causal, **options) -> DistCase:
        batch = 2 if seqlen_local <= 128 else 1
        return DistCase(method, n, batch, seqlen_local, causal=causal, load_balance=load_balance, **{**base, **options})

    if quick:  # causal, both layouts: a float bias; MQA, a per-head bias and the second dtype
        return [
            c
            for m in METHODS
            for c in (
                case(m, *variant_layouts[0], True, bias="float"),
                case(m, *variant_layouts[1], True, kv_heads=1, bias="tensor", dtype=dtypes[1]),
            )
        ]
    cases = [case(m, s, lb, c) for m in METHODS for s, lb in layouts for c in (False, True)]
    variants = [
        dict(dtype=dtypes[1]),
        dict(headdim=headdims[1]),
        dict(kv_heads=heads),
        dict(kv_heads=1),
        dict(bias="float"),
        dict(bias="tensor"),
        dict(dtype=dtypes[1], headdim=headdims[1], kv_heads=1, bias="tensor"),
    ]
    for options in variants:
        cases += [case(m, s, lb, c, **options) for m in METHODS for s, lb in variant_layouts for c in (False, True)]
    if not gpu and triton_on_cpu:  # the Triton launchers in the interpreter: slow, so tiny
        triton = dict(heads=heads, kv_heads=1, headdim=16, bias="tensor", dtype="bf16", backend="triton")
        cases += [DistCase(m, n, 1, 8, causal=True, load_balance=True, **triton) for m in METHODS]
    return list(dict.fromkeys(cases))


# ------------------------------------------------------------------------------------------------ one case

Results = dict[str, Tensor]  # "out", "dq", "dk", "dv" and, with a per-head bias tensor, "dbias"


def full_inputs(case: DistCase, device: torch.device) -> dict:
    """q, k, v, the output gradient and the bias of the whole sequence, the same on every rank (a fixed
    seed, drawn on the CPU): drawn in float64 and rounded to the case's dtype, so the float64 truth sees
    exactly the values the kernels see; kept in float64. tests/test_distributed.py draws its cases' inputs
    here too (any case with these fields and a ``seqlen``)."""
    gen = torch.Generator().manual_seed(1234)
    dtype = DTYPES[case.dtype]

    def randn(*shape) -> Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device, torch.float64)

    b, s, d = case.batch, case.seqlen, case.headdim
    args = dict(q=randn(b, s, case.heads, d), k=randn(b, s, case.kv_heads, d), v=randn(b, s, case.kv_heads, d))
    args["dout"] = randn(b, s, case.heads, d)
    if case.bias == "float":
        args["bias"] = -1.75
    elif case.bias == "tensor":
        args["bias"] = torch.linspace(-3.0, 0.5, case.heads, dtype=torch.float64).to(dtype).to(device, torch.float64)
    else:
        args["bias"] = None
    return args


def _leaves(args: dict, dtype: torch.dtype, shard=lambda t: t) -> dict[str, Tensor]:
    """Copies of q, k, v (through ``shard``) and of a bias tensor (replicated, like a model weight) in
    ``dtype``, requiring grad."""
    leaves = {name: shard(args[name]).to(dtype, copy=True).requires_grad_() for name in ("q", "k", "v")}
    if isinstance(args["bias"], Tensor):
        leaves["bias"] = args["bias"].to(dtype, copy=True).requires_grad_()
    return leaves


def _forward_backward(fn, leaves: dict[str, Tensor], args: dict, dout: Tensor) -> Results:
    out = fn(leaves["q"], leaves["k"], leaves["v"], bias=leaves.get("bias", args["bias"]))
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(out.dtype))
    return {"out": out.detach(), **{f"d{name}": g for name, g in zip(leaves, grads, strict=True)}}


def run_sharded(case: DistCase, args: dict) -> Results:
    """This rank's output and gradients from the context-parallel method. The bias gradient is only this
    rank's share (see ``ring_sigmoid_attn``); ``sum_over_group`` completes it."""
    rank, lb = dist.get_rank(), case.load_balance

    def shard(t: Tensor) -> Tensor:
        return shard_sequence(t, case.world_size, rank, load_balance=lb)

    def method(q, k, v, bias):
        return METHODS[case.method](q, k, v, causal=case.causal, bias=bias, load_balance=lb)

    with use_backend(case.backend or "auto"):
        return _forward_backward(method, _leaves(args, DTYPES[case.dtype], shard), args, shard(args["dout"]))


def sum_over_group(grad: Tensor) -> Tensor:
    """The sum over the group of a replicated weight's gradient, reduced in float32 (float64 for float64):
    gloo reduces no bfloat16, and one rounding to the weight's dtype at the end is what a float32 gradient
    reduction gives."""
    total = grad.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    dist.all_reduce(total)
    return total.to(grad.dtype)


def run_full_sequence(case: DistCase, args: dict) -> dict[str, Results]:
    """Single-process results on the whole sequence: ``truth`` (float64 reference), ``pytorch`` (the
    reference in the case's dtype: the rule's baseline) and ``single`` (``sigmoid_attn_func``, on the
    backend the case forces, else auto: the Triton kernel on CUDA)."""
    dtype = DTYPES[case.dtype]

    def reference(upcast: bool):
        return lambda q, k, v, bias: sigmoid_attn_reference(q, k, v, bias=bias, causal=case.causal, upcast=upcast)

    def single(q, k, v, bias):
        return sigmoid_attn_func(q, k, v, bias=bias, causal=case.causal)

    results = {
        "truth": _forward_backward(reference(True), _leaves(args, torch.float64), args, args["dout"]),
        "pytorch": _forward_backward(reference(False), _leaves(args, dtype), args, args["dout"]),
    }
    with use_backend(case.backend or "auto"):
        results["single"] = _forward_backward(single, _leaves(args, dtype), args, args["dout"])
    return results


def compare(case: DistCase, got: Results, full: dict[str, Results], record: dict) -> None:
    """Fills ``record`` with this rank's errors against the sharded single-process results; a result
    outside the rule (or of the wrong shape or dtype) is a failure."""
    dtype, rank = DTYPES[case.dtype], dist.get_rank()

    def shard(name: str, t: Tensor) -> Tensor:  # the bias gradient is per head, not per token
        return t if name == "dbias" else shard_sequence(t, case.world_size, rank, load_balance=case.load_balance)

    within = True
    for name, mine in got.items():
        truth, pytorch, single = (shard(name, full[key][name]) for key in ("truth", "pytorch", "single"))
        if mine.shape != truth.shape or mine.dtype != dtype:
            record["failures"].append(
                f"{name}: {mine.dtype} {tuple(mine.shape)}, expected {dtype} {tuple(truth.shape)}"
            )
            continue
        err, base = max_error(mine, truth), max_error(pytorch, truth)
        tol = allowed_error(base, sharded_term(truth, dtype))
        record["errors"][name], record["pytorch_errors"][name], record["tolerances"][name] = err, base, tol
        record["vs_single"][name] = max_error(mine, single)
        record["single_errors"][name] = max_error(single, truth)
        within &= record["vs_single"][name] <= tol
        if not err <= tol:  # NaN errors are inf (max_error): they fail too
            record["failures"].append(
                f"{name}: error {err:.3g} > tolerance {tol:.3g} (PyTorch {case.dtype}: {base:.3g})"
            )
    record["vs_single_within_rule"] = within


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _everyone(ok: bool, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank: the ranks agree before a collective so that all make it or none."""
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def run_case(case: DistCase, device: torch.device) -> dict:
    """This rank's record of one case. Every rank makes the same collective calls whatever happens to it
    (short of a failure inside the method's own communication): the ranks agree on failures before the
    method's collectives and before the bias reduction, and the comparisons come last."""
    record = {
        "rank": dist.get_rank(),
        "errors": {},
        "pytorch_errors": {},
        "tolerances": {},
        "vs_single": {},
        "single_errors": {},
        "vs_single_within_rule": False,
        "failures": [],
    }

    def attempt(step):
        try:
            return step()
        except Exception as error:  # recorded; the other ranks learn of it from _everyone
            record["failures"].append(_describe(error))
            return None

    args = attempt(lambda: full_inputs(case, device))
    got = attempt(lambda: run_sharded(case, args)) if _everyone(args is not None, device) else None
    if not _everyone(got is not None, device):
        if not record["failures"]:
            record["failures"].append("skipped: failed on another rank")
        return record
    if "dbias" in got:
        got["dbias"] = sum_over_group(got["dbias"])
    # No communication from here on: a failure (the reference out of memory, say) is this rank's alone.
    attempt(lambda: compare(case, got, run_full_sequence(case, args), record))
    return record


# ------------------------------------------------------------------------------------------------ the run


def make_row(case: DistCase, records: list[dict], seconds: float) -> dict:
    return {
        "id": case.id,
        "method": case.method,
        "world_size": case.world_size,
        "batch": case.batch,
        "seqlen_local": case.seqlen_local,
        "seqlen": case.seqlen,
        "heads": case.heads,
        "kv_heads": case.kv_heads,
        "headdim": case.headdim,
        "causal": case.causal,
        "load_balance": case.load_balance,
        "bias": case.bias,
        "dtype": case.dtype,
        "kernel_backend": case.backend or "auto",
        "passed": all(not r["failures"] for r in records),
        "vs_single_within_rule": all(r["vs_single_within_rule"] for r in records),
        "seconds": round(seconds, 3),
        "per_rank": records,
    }


def format_row(row: dict) -> str:
    """One line: per result, the largest error over the ranks / PyTorch's error; then the largest
    difference from the single-device kernel; each failure on a line of its own."""
    ranks = row["per_rank"]
    names = list(dict.fromkeys(name for r in ranks for name in r["errors"]))
    worst = {key: {n: max(r[key].get(n, 0.0) for r in ranks) for n in names} for key in ("errors", "pytorch_errors")}
    errs = " ".join(f"{n}={worst['errors'][n]:.1e}/{worst['pytorch_errors'][n]:.1e}" for n in names)
    diffs = [d for r in ranks for d in r["vs_single"].values()]
    single = f" single={max(diffs):.1e}" if diffs else ""
    note = "" if row["vs_single_within_rule"] or not row["passed"] else " (vs single: outside the rule)"
    lines = [f"{'ok  ' if row['passed'] else 'FAIL'} {row['id']:66s} {errs}{single}{note}"]
    lines += [f"     rank {r['rank']}: {failure}" for r in ranks for failure in r["failures"]]
    return "\n".join(lines)


def init(args: argparse.Namespace) -> tuple[torch.device, str]:
    """The process group (torchrun's environment): NCCL on ``cuda:LOCAL_RANK``, or gloo on the CPU."""
    if args.device == "cuda":
        for name, value in NCCL_DEFAULTS.items():
            os.environ.setdefault(name, value)  # before the first communicator
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # the object collectives use the current device
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(
        backend, timeout=timedelta(seconds=args.timeout), device_id=device if backend == "nccl" else None
    )
    return device, backend


def group_meta(argv: list[str], device: torch.device, backend: str) -> dict:
    """``sigattn.runinfo.run_meta`` of this rank's device, with NCCL's version (on CUDA), the world size and
    the process group's backend."""
    world_size = dist.get_world_size()
    command = ["torchrun", "--standalone", "--nproc-per-node", str(world_size), "-m", MODULE]
    meta = run_meta(shlex.join([*command, *argv]), device)
    if device.type == "cuda":
        meta["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    meta.update(world_size=world_size, backend=backend)
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"torchrun ... -m {MODULE}", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo, the CPU grid")
    p.add_argument("--json", metavar="PATH", help="rank 0 writes {meta, rows, summary} here")
    p.add_argument("--filter", metavar="REGEX", help="run only the cases whose id matches")
    p.add_argument("--quick", action="store_true", help="a few small cases")
    p.add_argument("--timeout", type=int, default=300, help="process group timeout, seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    device, backend = init(args)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # Triton reads TRITON_INTERPRET when it is imported (already, by importing sigattn): no re-exec here,
    # the Triton cases run only when the caller set it.
    triton_on_cpu = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
    cases = grid(world_size, device.type, args.quick, triton_on_cpu)
    cases = [c for c in cases if args.filter is None or re.search(args.filter, c.id)]
    meta = group_meta(argv, device, backend) if rank == 0 else {}
    rows: list[dict] = []

    def save() -> None:
        if rank == 0 and args.json:
            passed = sum(r["passed"] for r in rows)
            summary = {
                "passed": passed,
                "failed": len(rows) - passed,
                "failed_ids": [r["id"] for r in rows if not r["passed"]],
            }
            write_json(args.json, meta, rows, summary=summary)

    if rank == 0:
        print(f"{len(cases)} cases on {world_size} ranks ({backend}, {meta['device']})", flush=True)
    for case in cases:
        start = time.perf_counter()
        record = run_case(case, device)
        records: list = [None] * world_size
        dist.all_gather_object(records, record)  # every rank learns the verdict, so all exit alike
        rows.append(make_row(case, records, time.perf_counter() - start))
        if rank == 0:
            print(format_row(rows[-1]), flush=True)
        save()  # after every case, so a run cut short still leaves its record
        if device.type == "cuda":
            torch.cuda.empty_cache()
    failed = [r["id"] for r in rows if not r["passed"]]
    if rank == 0:
        print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
