"""The backward two ways on a GPU: python benchmarks/bwd_atomic.py --json PATH.

Deterministic (a dK/dV kernel and a dQ kernel: 7 matmuls per tile pair) against one kernel that adds dQ
atomically in float32 (5 matmuls), on ``sigattn bench``'s shapes (16k tokens, hidden 2048, bf16);
TFLOP/s count 2.5x the forward's FLOPs, medians from triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from functools import partial

import torch
import triton

from sigattn.check import versions
from sigattn.ops.sigmoid_attn import flash


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for head_dim, causal, seqlen in [(d, c, s) for d in (64, 128) for c in (False, True) for s in (1024, 4096, 16384)]:
        batch, heads = 16384 // seqlen, 2048 // head_dim
        q, k, v, do = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in "qkvo")
        params, _ = flash.flash_params(scale=head_dim**-0.5, bias=None, causal=causal, window_size=(-1, -1))
        pairs = seqlen * (seqlen + 1) / 2 if causal else seqlen * seqlen
        work = 2.5 * 4 * batch * heads * pairs * head_dim
        for deterministic in (True, False):
            p = dataclasses.replace(params, deterministic=deterministic)
            ms = triton.testing.do_bench(partial(flash.flash_bwd, do, q, k, v, p), return_mode="median")
            rows.append(dict(head_dim=head_dim, causal=causal, seqlen=seqlen, deterministic=deterministic, ms=ms,
                             tflops=work / ms * 1e-9))  # fmt: skip
            print(f"D{head_dim} causal={causal} S={seqlen} deterministic={deterministic}: {rows[-1]['tflops']:.0f}",
                  flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": versions(" ".join(["python", *sys.argv])), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
