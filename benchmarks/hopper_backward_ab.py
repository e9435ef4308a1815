"""Device script: the Gluon backward (hopper_bwd.py) through kernels.backward, checked against float64 (including
chunked workspaces, the deterministic fallback and per-head bias) and timed against the Triton backward
and SDPA. python benchmarks/hopper_backward_ab.py OUT.json [check|bench|both]"""

# ruff: noqa: B023 (each timed closure runs within the loop iteration that made it)

import itertools
import json
import math
import sys
import time

import torch
from triton.testing import do_bench

from sigattn.ops.sigmoid_attn import hopper_bwd, kernels
from sigattn.ops.sigmoid_attn.params import Params, Rows
from sigattn.ops.sigmoid_attn.reference import Mask, resolve_bias, sigmoid_attn_reference
from sigattn.runinfo import run_meta
from sigattn.testing.grid import Case, judge, reference_results, run_case

CASES = [  # B, Sq, Sk, H, Hkv, causal, top_left, dtype
    (2, 113, 113, 4, 4, False, False, torch.bfloat16),
    (2, 1023, 1023, 4, 2, True, False, torch.bfloat16),
    (1, 17, 300, 4, 1, True, False, torch.bfloat16),
    (1, 300, 17, 4, 4, True, False, torch.bfloat16),
    (1, 300, 17, 4, 4, True, True, torch.bfloat16),
    (1, 17, 300, 4, 4, True, True, torch.float16),
    (1, 1, 1, 2, 2, False, False, torch.bfloat16),
    (2, 1024, 1024, 8, 8, False, False, torch.float16),
    (1, 2048, 2048, 4, 4, True, False, torch.bfloat16),
    (1, 1000, 257, 2, 2, True, False, torch.float16),
    (3, 257, 1000, 8, 2, False, False, torch.bfloat16),
]
HEAD_BIAS_CASES = [  # B, Sq, Sk, H, Hkv, extra options
    (2, 113, 203, 8, 2, {}),
    (2, 1023, 1023, 8, 2, dict(causal=True)),
    (1, 300, 17, 4, 4, dict(causal=True, top_left=True)),
    (3, 2048, 2048, 4, 1, dict(causal=True, dtype="float16")),
]


def run(B, Sq, Sk, H, Hkv, D, causal, top_left, dtype, deterministic=False, workspace=None):
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (
        torch.randn(B, s, h, D, generator=g).to("cuda", dtype) for s, h in ((Sq, H), (Sk, Hkv), (Sk, Hkv), (Sq, H))
    )
    opts = dict(scale=D**-0.5, causal=causal, window_size=(-1, -1), top_left=top_left)
    params = Params(D**-0.5, Mask(causal=causal, top_left=top_left), deterministic)
    bias = resolve_bias(None, Sk)
    grads = tuple(torch.full_like(t, math.nan) for t in (q, k, v))
    saved = hopper_bwd.WORKSPACE_BYTES
    if workspace:
        hopper_bwd.WORKSPACE_BYTES = workspace
    try:
        kernel, _ = kernels.choose(kernels.BACKWARD, do, q, k, v, grads, params, bias, None, Rows.dense(q, k))
        on_sm90 = kernel.name == "gluon-sm90"
        kernels.backward(do, q, k, v, params, bias, grads=grads)
    finally:
        hopper_bwd.WORKSPACE_BYTES = saved
    torch.cuda.synchronize()
    row = dict(
        case=[B, Sq, Sk, H, Hkv, D, causal, top_left, str(dtype)],
        deterministic=deterministic,
        workspace=workspace,
        on_sm90=on_sm90,
        ok=True,
    )
    ref = reference_results(sigmoid_attn_reference, [q, k, v], None, do, **opts)
    judge(row, ["dq", "dk", "dv"], list(grads), ref[True][1:4], ref[False][1:4], dtype)
    return row, grads


def check(results):
    for (B, Sq, Sk, H, Hkv, causal, top_left, dtype), D in itertools.product(CASES, (128, 64)):
        try:
            row, _ = run(B, Sq, Sk, H, Hkv, D, causal, top_left, dtype)
        except Exception as e:  # noqa: BLE001
            row = dict(
                case=[B, Sq, Sk, H, Hkv, D, causal, top_left, str(dtype)],
                ok=False,
                error=f"{type(e).__name__}: {str(e)[:400]}",
            )
        print(row, flush=True)
        results["check"].append(row)
    # chunked workspaces: by kv heads (one row's kv head > budget), by batch rows; and the deterministic path
    for D, ws in ((128, 200_000), (128, 2 * 1000 * 8 * 128 * 4), (64, 1)):
        row, _ = run(3, 1000, 1000, 8, 2, D, True, False, torch.bfloat16, workspace=ws)
        row["chunks"] = None
        print(row, flush=True)
        results["check"].append(row)
    # per-head bias (its gradient summed by the kernel), through the check grid's runner
    for D, (B, Sq, Sk, H, Hkv, extra) in itertools.product((128, 64), HEAD_BIAS_CASES):
        row = run_case(Case(B, Sq, Sk, H, Hkv, D, head_bias=True, **extra), "cuda")
        row["ok"] &= row["backward_kernel"] == "gluon-sm90"
        print(row, flush=True)
        results["check"].append(row)
    for D in (128, 64):
        row, first = run(2, 1023, 1023, 4, 2, D, True, False, torch.bfloat16, deterministic=True)
        _, second = run(2, 1023, 1023, 4, 2, D, True, False, torch.bfloat16, deterministic=True)
        row["bitwise_repeat"] = all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
        row["ok"] &= row["bitwise_repeat"] and not row["on_sm90"]
        print(row, flush=True)
        results["check"].append(row)


def bench(results):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for D, causal, S in itertools.product((128, 64), (False, True), (1024, 2048, 4096)):
        B, H = 16384 // S, 2048 // D
        q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        flops = 2.5 * 4 * B * H * S * S * D / (2 if causal else 1)
        bias = resolve_bias(None, S)
        p_fast = Params(D**-0.5, Mask(causal=causal))
        p_det = Params(D**-0.5, Mask(causal=causal), deterministic=True)
        head_bias = torch.full((H,), -math.log(S), device="cuda")

        def keys4096():
            saved, hopper_bwd.WORKSPACE_KEYS = hopper_bwd.WORKSPACE_KEYS, 4096
            try:
                return kernels.backward(do, q, k, v, p_fast, bias)
            finally:
                hopper_bwd.WORKSPACE_KEYS = saved

        fns = {
            "triton": lambda: kernels.backward(do, q, k, v, p_det, bias),
            "gluon": lambda: kernels.backward(do, q, k, v, p_fast, bias),
            "gluon_keys4096": keys4096,
            "triton_headbias": lambda: kernels.backward(do, q, k, v, p_det, head_bias),
            "gluon_headbias": lambda: kernels.backward(do, q, k, v, p_fast, head_bias),
        }
        qt, kt, vt, dot = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v, do))
        for nm, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel(be):
                o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            fns[nm] = lambda o=o: torch.autograd.grad(o, (qt, kt, vt), dot, retain_graph=True)
        row = dict(D=D, causal=causal, S=S, chunks=hopper_bwd._chunks(B, H, S * D * 4, S))
        for fn in fns.values():  # compiled before timing: do_bench sizes its loops on a first call
            fn()
        for _ in range(2):  # interleaved twice: clock drift hits every provider
            for name, fn in fns.items():
                try:
                    ms = do_bench(fn, warmup=100, rep=100, return_mode="median")
                    row.setdefault(name, []).append(flops / ms / 1e9)
                except Exception as e:  # noqa: BLE001
                    row[name] = f"{type(e).__name__}: {str(e)[:200]}"
        best = {n: max(x) for n, x in row.items() if n in fns and isinstance(x, list)}
        print(
            row["D"],
            row["causal"],
            row["S"],
            row["chunks"],
            {n: round(x) for n, x in best.items()},
            "gluon/cudnn %.2f" % (best["gluon"] / best["cudnn"]),
            "gluon_headbias/triton_headbias %.2f" % (best["gluon_headbias"] / best["triton_headbias"]),
            flush=True,
        )
        results["bench"].append(row)


if __name__ == "__main__":
    results = {"meta": run_meta(" ".join(["python"] + sys.argv)), "check": [], "bench": []}
    what = sys.argv[2] if len(sys.argv) > 2 else "both"
    t0 = time.time()
    if what in ("check", "both"):
        check(results)
        print(
            f"check {time.time() - t0:.0f}s, failed:",
            [r.get("case", r.get("id")) for r in results["check"] if not r["ok"]],
            flush=True,
        )
    if what in ("bench", "both"):
        bench(results)
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)
