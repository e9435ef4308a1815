"""Host time against GPU time of one attention call, ours and SDPA's, on a GPU:
python benchmarks/host_overhead.py [--shape B S H D] --json PATH.

Small models spend a step launching kernels, so the Python cost of a call matters as much as its kernel.
Per call, causal, bf16, at shakespeare-char's shape by default (64 x 256 tokens, 6 heads of 64):
- ``wall_us``: a loop of calls with one synchronisation at the end, max(host, GPU) per call;
- ``host_us``: the same loop timed before that synchronisation, the Python (and driver) time per call;
- ``gpu_us``: 50 calls replayed from one CUDA graph, the kernels alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sigattn
from sigattn.ops.sigmoid_attn import kernels
from sigattn.ops.sigmoid_attn.params import Params
from sigattn.ops.sigmoid_attn.reference import Mask
from sigattn.runinfo import run_meta


def loop_us(fn: Callable[[], object], *, wait: bool, n: int = 300) -> float:
    """Mean microseconds per call over n back-to-back calls: with ``wait``, until the GPU has finished them
    (max(host, GPU) per call); without, until the host has issued them."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if wait:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def graph_us(fn: Callable[[], object], n: int = 50) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and allocate outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n)
    return sorted(times)[len(times) // 2]


def calls(batch: int, seqlen: int, heads: int, head_dim: int) -> dict[str, Callable[[], object]]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        for _ in range(3)
    )
    do = torch.randn_like(q)
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))  # SDPA's (B, H, S, D) views
    dot = do.transpose(1, 2)
    bias = -math.log(seqlen)
    params = Params(head_dim**-0.5, Mask(causal=True))

    def ours_fwd():
        with torch.no_grad():
            return sigattn.sigmoid_attn_func(q, k, v, causal=True, bias=bias)

    def ours_fwd_bwd():
        return torch.autograd.grad(sigattn.sigmoid_attn_func(q, k, v, causal=True, bias=bias), (q, k, v), do)

    def sdpa(backend):
        def fwd():
            with torch.no_grad(), sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        def fwd_bwd():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            return torch.autograd.grad(out, (qt, kt, vt), dot)

        return fwd, fwd_bwd

    cudnn_fwd, cudnn_fwd_bwd = sdpa(SDPBackend.CUDNN_ATTENTION)
    fa2_fwd, fa2_fwd_bwd = sdpa(SDPBackend.FLASH_ATTENTION)
    return {
        "sigattn fwd": ours_fwd,
        "sigattn fwd+bwd": ours_fwd_bwd,
        "launcher fwd": lambda: kernels.forward(q.detach(), k.detach(), v.detach(), params, bias),
        "launcher bwd": lambda: kernels.backward(do, q.detach(), k.detach(), v.detach(), params, bias),
        "cudnn fwd": cudnn_fwd,
        "cudnn fwd+bwd": cudnn_fwd_bwd,
        "flash fwd": fa2_fwd,
        "flash fwd+bwd": fa2_fwd_bwd,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", nargs=4, type=int, default=(64, 256, 6, 64), metavar=("B", "S", "H", "D"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for name, fn in calls(*args.shape).items():
        wall, host = loop_us(fn, wait=True), loop_us(fn, wait=False)
        row = {"call": name, "wall_us": wall, "host_us": host, "gpu_us": graph_us(fn)}
        rows.append(row)
        print(json.dumps({k: round(x, 1) if isinstance(x, float) else x for k, x in row.items()}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            meta = run_meta(" ".join(["python", *sys.argv]))
            json.dump({"meta": {**meta, "shape": list(args.shape)}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
