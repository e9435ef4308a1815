"""The forward with K/V tiles loaded by TMA descriptors against plain pointer loads, on a GPU:
python benchmarks/tma_forward.py --json PATH. ``sigattn bench``'s shapes (16k tokens, hidden 2048, bf16),
medians of triton.testing.do_bench, each variant measured twice, interleaved. The Triton forward
(``triton_host.launch_forward`` with its ``FWD_CONFIGS`` tiles and ``use_tma``), also where ``kernels.forward``
would run the Gluon one."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import torch
import triton

from sigattn.ops.sigmoid_attn import triton_host
from sigattn.ops.sigmoid_attn.params import Params, Rows
from sigattn.ops.sigmoid_attn.reference import Mask, resolve_bias
from sigattn.runinfo import run_meta


def triton_forward(q, k, v, params, bias, use_tma: bool):
    """``triton_host.launch_forward`` with its default tiles into a fresh output, TMA loads on or off."""
    out = torch.empty_like(q)
    triton_host.launch_forward(q, k, v, out, params, bias, None, Rows.dense(q, k), use_tma=use_tma)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for head_dim, causal, seqlen in [(d, c, s) for d in (64, 128) for c in (False, True) for s in (1024, 4096, 16384)]:
        batch, heads = 16384 // seqlen, 2048 // head_dim
        q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
        params, bias = Params(head_dim**-0.5, Mask(causal=causal)), resolve_bias(None, seqlen)
        pairs = seqlen * (seqlen + 1) / 2 if causal else seqlen * seqlen
        work = 4 * batch * heads * pairs * head_dim
        for tma in (False, True, False, True):
            ms = triton.testing.do_bench(partial(triton_forward, q, k, v, params, bias, tma), return_mode="median")
            rows.append(dict(head_dim=head_dim, causal=causal, seqlen=seqlen, tma=tma, ms=ms, tflops=work / ms * 1e-9))
            print(f"D{head_dim} causal={causal} S={seqlen} tma={tma}: {rows[-1]['tflops']:.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": run_meta(" ".join(["python", *sys.argv])), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
