"""The varlen forward against the dense forward on the same tokens, launchers only (no Python dispatch):
python benchmarks/varlen_vs_dense.py --json PATH. 16k tokens as 16k / S sequences of length S, H = 16,
D = 128, bf16; medians of triton.testing.do_bench (rep 300 ms), each measured twice, interleaved."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import torch
import triton

from sigattn.ops.sigmoid_attn import flash
from sigattn.runinfo import run_meta

H, D, TOKENS = 16, 128, 16384


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for seqlen, causal in [(2048, True), (4096, True), (8192, True), (4096, False)]:
        batch = TOKENS // seqlen
        q, k, v = (torch.randn(TOKENS, H, D, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
        cu = torch.arange(0, TOKENS + 1, seqlen, dtype=torch.int32, device="cuda")
        params, _ = flash.flash_params(scale=D**-0.5, bias=None, causal=causal, window_size=(-1, -1))
        flops = 4 * batch * H * D * (seqlen * (seqlen + 1) / 2 if causal else seqlen * seqlen)
        shape = (batch, seqlen, H, D)
        steps = {
            "dense": partial(flash.flash_fwd, q.view(shape), k.view(shape), v.view(shape), params),
            "varlen": partial(flash.flash_varlen_fwd, q, k, v, cu, cu, seqlen, seqlen, params),
        }
        for name in ["dense", "varlen", "dense", "varlen"]:
            ms = triton.testing.do_bench(steps[name], rep=300, return_mode="median")
            rows.append(dict(kernel=name, seqlen=seqlen, causal=causal, ms=ms, tflops=flops / ms * 1e-9))
            print(f"S={seqlen} causal={causal} {name}: {rows[-1]['tflops']:.0f} TFLOP/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": run_meta(" ".join(["python", *sys.argv])), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
