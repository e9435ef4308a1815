"""Large-batch decode, where cuDNN led by 2-8%, on a GPU:
python benchmarks/decode_large_batch.py OUT.json [BATCH:CACHE:HEADS:KV_HEADS ...] (default: SHAPES).

KV-cache tiles, warps, stages and splits against SDPA's cuDNN backend on the same inputs, all
graph-replayed with the L2 flushed (``sigattn bench --decode``'s timing). Each config replaces every
contiguous-cache table (KVCACHE_CONFIGS and the two many-programs ones), so it is what runs whatever the
plan's rule. Chose KVCACHE_MANY_PROGRAMS_CONFIGS and KVCACHE_SHORT_MANY_PROGRAMS_CONFIGS
(benchmarks/results/decode_large_batch_h100_2026-11-25.json, whose version also swept TMA loads: -1.7% to
+1%; decode_large_batch_h200_2026-12-03.json)."""

import math
import sys
from functools import partial

import torch
from graph_timing import bench_graph, write_result
from torch.nn.attention import SDPBackend, sdpa_kernel

from sigattn.ops.sigmoid_attn import kernels, triton_host
from sigattn.ops.sigmoid_attn.params import Params
from sigattn.ops.sigmoid_attn.triton_host import TileConfig

SHAPES = [  # (batch, cache length, heads, kv heads)
    (16, 4096, 32, 32),
    (16, 8192, 32, 32),
    (16, 32768, 32, 32),
    (64, 4096, 32, 8),
    (64, 16384, 32, 8),
    (64, 32768, 32, 8),
    (64, 8192, 32, 32),
    (16, 8192, 32, 8),
    (4, 32768, 32, 32),
    (64, 1024, 32, 8),
]
# (block_n, warps, stages)
CONFIGS = [(64, 4, 3), (64, 4, 2), (32, 4, 3), (128, 4, 2), (128, 4, 3), (64, 2, 3), (128, 8, 3), (64, 8, 3)]


def measure(B, S, Hq, Hkv):
    """One shape's rows: cuDNN, then the KV-cache kernel per tiles, splits and TMA on/off."""
    D = 128
    kvb = 2 * B * S * Hkv * D * 2
    q = torch.randn(B, 1, Hq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=Hq != Hkv)

    cud = bench_graph(cudnn, n=50)
    params, bias = Params(D**-0.5), -math.log(S)
    out = torch.empty_like(q)
    plan = triton_host.kvcache_plan(B, 1, Hq, Hkv, D, S, q.device)  # printed: the plan of the committed tables
    best = None
    print(f"B{B} S{S} {Hq}/{Hkv}: cudnn {cud:.1f} us {kvb / cud / 1e3:.0f} GB/s; plan {plan}", flush=True)
    rows = []
    tables = (
        triton_host.KVCACHE_CONFIGS,
        triton_host.KVCACHE_MANY_PROGRAMS_CONFIGS,
        triton_host.KVCACHE_SHORT_MANY_PROGRAMS_CONFIGS,
    )
    committed = [table[128] for table in tables]
    for bn, w, st in CONFIGS:
        for table in tables:
            table[128] = TileConfig(64, bn, w, st)
        for splits in (1, 2, 4):
            call = partial(kernels.decode, q, k, v, params, bias, None, None, out=out, num_splits=splits)
            us = bench_graph(call, n=50)
            rows.append(
                dict(
                    batch=B,
                    cache_len=S,
                    heads=Hq,
                    kv_heads=Hkv,
                    config=[64, bn, w, st],
                    splits=splits,
                    us=us,
                    cudnn_us=cud,
                    gbps=kvb / us / 1e3,
                )
            )
            if best is None or us < best[0]:
                best = (us, bn, w, st, splits)
            print(f"   {bn},{w}w,{st}s splits {splits}: {us:7.1f} us  vs cudnn {cud / us:.3f}", flush=True)
    for table, config in zip(tables, committed, strict=True):
        table[128] = config
    print(f"  BEST {best} vs cudnn {cud / best[0]:.3f}", flush=True)
    return rows


def main() -> None:
    out_path = sys.argv[1]
    shapes = [tuple(map(int, arg.split(":"))) for arg in sys.argv[2:]] or SHAPES
    rows = []
    for shape in shapes:
        rows += measure(*shape)
        torch.cuda.empty_cache()  # the last shape's cache is garbage now
    write_result(out_path, rows)


if __name__ == "__main__":
    main()
