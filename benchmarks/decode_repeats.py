"""Decode against cuDNN, repeated, at the points where one ``sigattn bench --decode`` run trailed, on a GPU:
python benchmarks/decode_repeats.py OUT.json [ROUNDS] [BATCH:CACHE:HEADS:KV_HEADS ...] (default: SHAPES).

One bench run times each provider once per point, one after the other, and calls of 10-80 us move by
5-10% between runs. Here the public KV-cache call and SDPA's cuDNN backend alternate ROUNDS times (default
5) on the same inputs, each timed as the bench does (graph replays, L2 flushed), so drift hits both; the
per-round ratios say whether a gap is the kernel's or the run's."""

import math
import statistics
import sys

import torch
from graph_timing import bench_graph, write_result
from torch.nn.attention import SDPBackend, sdpa_kernel

from sigattn.ops.sigmoid_attn import kernels
from sigattn.ops.sigmoid_attn.params import Params

SHAPES = [  # (batch, cache length, heads, kv heads): below 1.0x cuDNN in bench_decode_h200_2026-12-03_short_tiles
    (1, 1024, 32, 32),
    (16, 1024, 32, 32),
    (4, 131072, 32, 32),
    (16, 131072, 32, 8),
    (4, 65536, 32, 32),
    (16, 65536, 32, 8),
    (16, 4096, 32, 32),
    (64, 4096, 32, 8),
    (64, 4096, 32, 32),
    (64, 8192, 32, 32),
    (64, 32768, 32, 8),
    (16, 8192, 32, 32),
]


def measure(B, S, Hq, Hkv, rounds):
    D = 128
    q = torch.randn(B, 1, Hq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    params, bias = Params(D**-0.5), -math.log(S)
    out = torch.empty_like(q)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=Hq != Hkv)

    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(bench_graph(lambda: kernels.decode(q, k, v, params, bias, None, None, out=out)))
        theirs.append(bench_graph(cudnn))
    ratios = [t / o for o, t in zip(ours, theirs, strict=True)]
    kvb = 2 * B * S * Hkv * D * 2
    print(
        f"B{B} S{S} {Hq}/{Hkv}: sigattn {statistics.median(ours):.1f} us ({kvb / statistics.median(ours) / 1e3:.0f}"
        f" GB/s), cudnn {statistics.median(theirs):.1f} us; cudnn/sigattn per round "
        + " ".join(f"{r:.3f}" for r in ratios),
        flush=True,
    )
    return dict(
        batch=B,
        cache_len=S,
        heads=Hq,
        kv_heads=Hkv,
        kv_bytes=kvb,
        sigattn_us=ours,
        cudnn_us=theirs,
        cudnn_over_sigattn=ratios,
        median_ratio=statistics.median(ratios),
    )


def main() -> None:
    out_path = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    shapes = [tuple(map(int, arg.split(":"))) for arg in sys.argv[3:]] or SHAPES
    rows = []
    for shape in shapes:
        rows.append(measure(*shape, rounds))
        torch.cuda.empty_cache()
    write_result(out_path, rows)


if __name__ == "__main__":
    main()
