"""Sweep tile configs of the three kernels on a GPU: python benchmarks/tune_tiles.py --json PATH
[--kernels fwd dkdv dq] [--seqlens 4096 ...] [--head-dims 64 128] [--masks full causal].

flash-attn's standard setup (16k tokens, hidden 2048, bf16) at one or more sequence lengths. On sm_90 the
dense forward at head dim 128 and the backward at 64 and 128 (beyond 128-512 queries, unless
deterministic) run on the Gluon kernels, which these tables do not steer. Each kernel's table entry is
varied with the others fixed; medians from triton.testing.do_bench. The best config of a (kernel, head
dim, mask) has the highest geometric mean of TFLOP/s over the sequence lengths. The winners go into the
tables in sigattn/ops/sigmoid_attn/triton_host.py, citing the JSON this writes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from functools import partial

import torch
import triton

from sigattn.ops.sigmoid_attn import kernels, triton_host
from sigattn.ops.sigmoid_attn.params import Params
from sigattn.ops.sigmoid_attn.reference import Mask, resolve_bias
from sigattn.runinfo import run_meta

CANDIDATES = {
    "fwd": [
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (128, 32, 4, 3),
        (128, 32, 4, 5),
        (64, 32, 4, 4),
        (128, 64, 8, 4),
        (128, 32, 8, 4),
        (128, 128, 8, 3),
        (128, 64, 4, 4),
        (64, 128, 4, 3),
    ],
    "dkdv": [
        (64, 64, 4, 3),
        (64, 64, 4, 2),
        (64, 64, 4, 4),
        (64, 64, 8, 3),
        (32, 64, 4, 3),
        (64, 32, 4, 3),
        (128, 64, 8, 3),
        (32, 32, 4, 3),
        (64, 128, 8, 2),
        (64, 128, 8, 3),
        (32, 128, 8, 3),
    ],
    "dq": [
        (128, 64, 8, 3),
        (64, 64, 4, 3),
        (64, 64, 4, 2),
        (64, 32, 4, 3),
        (128, 32, 8, 3),
        (32, 64, 4, 3),
        (64, 64, 8, 3),
        (128, 32, 4, 3),
    ],
}
TABLES = {"fwd": triton_host.FWD_CONFIGS, "dkdv": triton_host.BWD_DKDV_CONFIGS, "dq": triton_host.BWD_DQ_CONFIGS}


def flops(batch, heads, seqlen, head_dim, causal):
    pairs = seqlen * (seqlen + 1) / 2 if causal else seqlen * seqlen
    return 4 * batch * heads * pairs * head_dim


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096])
    parser.add_argument("--kernels", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--head-dims", type=int, nargs="+", choices=[64, 128], default=[64, 128])
    parser.add_argument("--masks", nargs="+", choices=["full", "causal"], default=["full", "causal"])
    args = parser.parse_args()
    rows = []
    causals = [mask == "causal" for mask in args.masks]
    settings = [(d, c, s) for d in args.head_dims for c in causals for s in args.seqlens]
    for head_dim, causal, seqlen in settings:
        batch, heads = 16384 // seqlen, 2048 // head_dim
        shape = (batch, seqlen, heads, head_dim)
        q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        params, bias = Params(head_dim**-0.5, Mask(causal=causal)), resolve_bias(None, seqlen)
        fwd_flops = flops(batch, heads, seqlen, head_dim, causal)
        for kernel in args.kernels:
            candidates, table = CANDIDATES[kernel], TABLES[kernel]
            default = table[(head_dim, causal)]
            for cand in candidates:
                table[(head_dim, causal)] = triton_host.TileConfig(*cand)
                try:
                    if kernel == "fwd":
                        fn, work = partial(kernels.forward, q, k, v, params, bias), fwd_flops
                    else:
                        fn, work = partial(kernels.backward, do, q, k, v, params, bias), 2.5 * fwd_flops
                    ms = triton.testing.do_bench(fn, return_mode="median")
                    tf = work / ms * 1e-9
                except Exception as e:  # out of shared memory or registers: record and go on
                    ms, tf = math.nan, math.nan
                    print(f"  {kernel} {cand}: {type(e).__name__}: {str(e)[:120]}")
                rows.append(
                    dict(kernel=kernel, head_dim=head_dim, causal=causal, seqlen=seqlen, config=cand, ms=ms, tflops=tf)
                )
                print(
                    f"D{head_dim} causal={causal} S={seqlen} {kernel:5s} {cand}: {ms:.3f} ms {tf:.0f} TFLOP/s",
                    flush=True,
                )
            table[(head_dim, causal)] = default
    scores = defaultdict(list)  # (key, config) -> TFLOP/s at each seqlen
    for r in rows:
        scores[(f"{r['kernel']}-D{r['head_dim']}-{'causal' if r['causal'] else 'full'}", tuple(r["config"]))].append(
            r["tflops"]
        )
    best = {}
    for (key, config), values in scores.items():
        score = math.nan if any(math.isnan(v) for v in values) else math.exp(sum(map(math.log, values)) / len(values))
        if not math.isnan(score) and (key not in best or score > best[key]["tflops_geomean"]):
            best[key] = dict(config=config, tflops_geomean=score, tflops=values, seqlens=args.seqlens)
    print("\nbest:")
    for key, r in best.items():
        print(f"  {key:20s} {r['config']} {r['tflops_geomean']:.0f} TFLOP/s (geometric mean)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": run_meta(" ".join(["python", *sys.argv])), "rows": rows, "best": best}, f, indent=1)


if __name__ == "__main__":
    main()
