"""Correctness grid of the Triton kernels: ``python -m sigattn.check [--quick] [--json PATH]``.

The rule is flash-attn's: for the output and every gradient,
    max|kernel - float64 reference| <= 2 * max|PyTorch in the same precision - float64 reference| + rounding
where rounding = eps(dtype) * max|reference| is the final cast of a float32 accumulator to the output dtype.
Outputs and gradients are poisoned with NaN before each run, so an unwritten element fails.
On the CPU the same grid (smaller) runs through TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass

import torch

from .ops.sigmoid_attn.reference import sigmoid_attn_reference


@dataclass(frozen=True)
class Case:
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

    @property
    def id(self) -> str:
        parts = [
            f"B{self.batch}-Sq{self.seqlen_q}-Sk{self.seqlen_k}-H{self.heads}-Hkv{self.kv_heads}-D{self.head_dim}",
            {"bfloat16": "bf16", "float16": "fp16"}.get(self.dtype, self.dtype),
        ]
        parts += ["causal"] * self.causal + [f"win{self.window[0]}_{self.window[1]}"] * (self.window != (-1, -1))
        parts += ["alibi"] * self.alibi + ["headbias"] * self.head_bias + ["topleft"] * self.top_left
        return "-".join(parts)


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    err = (x.double() - ref).abs().max().item() if x.numel() else 0.0
    return math.inf if math.isnan(err) else err


def run_case(case: Case, device: str | torch.device, seed: int = 0) -> dict:
    """Run one case through the kernel launchers; returns errors, tolerances and ``ok``."""
    from .ops.sigmoid_attn.flash import flash_bwd, flash_fwd, flash_params

    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, case.dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q = randn(case.batch, case.seqlen_q, case.heads, case.head_dim)
    k = randn(case.batch, case.seqlen_k, case.kv_heads, case.head_dim)
    v = randn(case.batch, case.seqlen_k, case.kv_heads, case.head_dim)
    do = randn(case.batch, case.seqlen_q, case.heads, case.head_dim)
    bias = torch.randn(case.heads, generator=gen).to(device) if case.head_bias else None
    alibi = (torch.rand(case.batch, case.heads, generator=gen) * 0.5).to(device) if case.alibi else None
    scale = case.head_dim**-0.5
    opts = dict(scale=scale, bias=bias, causal=case.causal, window_size=case.window, top_left=case.top_left)

    params, head_bias = flash_params(case.seqlen_k, **opts)
    out = torch.full_like(q, math.nan)
    grads = tuple(torch.full_like(t, math.nan) for t in (q, k, v))
    flash_fwd(q, k, v, params, head_bias, alibi, out=out)
    dq, dk, dv, dbias = flash_bwd(do, q, k, v, params, head_bias, alibi, grads=grads)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    results = {}
    for upcast in (True, False):
        ins = [t.detach().clone().requires_grad_() for t in leaves]
        kw = dict(opts, bias=ins[3] if bias is not None else None)
        ref = sigmoid_attn_reference(*ins[:3], alibi_slopes=alibi, upcast=upcast, **kw)
        results[upcast] = [ref, *torch.autograd.grad(ref, ins, do.double() if upcast else do)]

    names = ["out", "dq", "dk", "dv"] + (["dbias"] if bias is not None else [])
    ours = [out, dq, dk, dv] + ([dbias] if bias is not None else [])
    row = {"id": case.id, **asdict(case), "ok": True}
    eps = torch.finfo(dtype).eps
    for name, mine, truth, baseline in zip(names, ours, results[True], results[False], strict=True):
        err, base = _max_err(mine, truth), _max_err(baseline, truth)
        tol = 2 * base + eps * (truth.abs().max().item() if truth.numel() else 0.0)
        row[f"{name}_err"], row[f"{name}_pt_err"] = err, base
        row["ok"] &= err <= tol
    return row


def grid(quick: bool) -> list[Case]:
    """Odd lengths, Sq != Sk, every head dim, both dtypes, all masks, GQA/MQA, ALiBi, per-head bias."""
    masks = [
        dict(),
        dict(causal=True),
        dict(window=(64, 32)),
        dict(causal=True, window=(100, -1)),
        dict(causal=True, top_left=True),
        dict(alibi=True, causal=True),
        dict(head_bias=True),
    ]
    if quick:
        shapes = [(1, 1), (17, 17), (113, 203), (203, 113)]
        cases = [Case(2, sq, sk, 4, 2, 32, **m) for (sq, sk), m in itertools.product(shapes, masks)]
        cases += [Case(1, 40, 37, 2, 1, d, dtype=dt) for d in (16, 24, 64) for dt in ("bfloat16", "float16")]
        return cases
    shapes = [(1, 1), (17, 17), (113, 203), (203, 113), (1023, 1023), (1, 1023), (2048, 2048)]
    cases = [
        Case(2, sq, sk, 8, hkv, d, **m)
        for d in (64, 128)
        for (sq, sk), m, hkv in itertools.product(shapes, masks, (8, 2, 1))
        if hkv == 2 or (m == {} and sq == 113) or (m == dict(causal=True) and sq == 1023)
    ]
    for d, dt in itertools.product((32, 40, 64, 80, 96, 128, 192, 256), ("bfloat16", "float16")):
        for (sq, sk), m in itertools.product(((113, 203), (1023, 1023)), (dict(), dict(causal=True))):
            cases.append(Case(2, sq, sk, 4, 2, d, dtype=dt, **m))
    return list(dict.fromkeys(cases))


def versions() -> dict:
    import triton

    meta = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m sigattn.check", *sys.argv[1:]]),
    }
    if torch.cuda.is_available():
        meta["device"] = torch.cuda.get_device_name()
        meta["cuda"] = torch.version.cuda
    else:
        meta["device"] = "cpu (TRITON_INTERPRET=1)"
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sigattn.check", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small grid (the CPU default)")
    parser.add_argument("--json", metavar="PATH", help="write {meta, rows} here")
    parser.add_argument("--filter", metavar="REGEX", help="run only the cases whose id matches")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
    quick = args.quick or device == "cpu"
    rows, meta = [], versions()
    cases = [c for c in grid(quick) if args.filter is None or re.search(args.filter, c.id)]
    for case in cases:
        row = run_case(case, device)
        rows.append(row)
        errs = " ".join(f"{n}={row[n + '_err']:.1e}/{row[n + '_pt_err']:.1e}" for n in ("out", "dq", "dk", "dv"))
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {case.id:60s} {errs}", flush=True)
        if args.json:  # after every case, so a run cut short still leaves its record
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    failed = [r["id"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
