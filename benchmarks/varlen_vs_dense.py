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

from sigattn.ops.sigmoid_attn import kernels
from sigattn.ops.sigmoid_attn.params import Params, Rows
from sigattn.ops.sigmoid_attn.reference import Mask, resolve_bias
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
        params = Params(D**-0.5, Mask(causal=causal))
        flops = 4 * batch * H * D * (seqlen * (seqlen + 1) / 2 if causal else seqlen * seqlen)
        shape = (batch, seqlen, H, D)
        steps = {
            # dense rows take the bias resolved (-log S, as the public functions pass it); packed ones None,
            # -log of each sequence's length: the same S here
            "dense": partial(
                kernels.forward, q.view(shape), k.view(shape), v.view(shape), params, resolve_bias(None, seqlen)
            ),
            "varlen": partial(kernels.forward, q, k, v, params, None, None, Rows.packed(cu, cu, seqlen, seqlen)),
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
