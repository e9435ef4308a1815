"""Where small-batch decode loses its time, on a GPU: python benchmarks/decode_splits.py OUT.json.

Graph-replayed (L2 flushed, one replay per timing, as ``sigattn bench --decode``), for the shapes that miss
80% of the copy's bandwidth: the KV-cache kernel alone against the kernel plus the split sum, per (tiles,
splits); floors: an empty kernel, and a copy moving the same bytes (read + write = the K and V bytes).
Results: benchmarks/results/decode_small_batch_h100_2026-11-25_splits.json (with the split sum of then,
a loop over the splits)."""

import math
import sys
from functools import partial

import torch
from graph_timing import bench_copy, bench_graph, write_result

from sigattn.ops.sigmoid_attn import kernels, triton_host
from sigattn.ops.sigmoid_attn.params import Params, Rows
from sigattn.ops.sigmoid_attn.triton_host import TileConfig

SHAPES = [  # (batch, cache length, heads, kv heads)
    (1, 8192, 32, 8),
    (1, 16384, 32, 8),
    (1, 32768, 32, 8),
    (4, 8192, 32, 8),
    (1, 8192, 32, 32),
    (4, 16384, 32, 8),
    (1, 131072, 32, 8),
    (4, 32768, 32, 32),
]
CONFIGS = [TileConfig(16, 64, 4, 3), TileConfig(16, 128, 4, 3), TileConfig(16, 64, 4, 4), TileConfig(16, 128, 4, 4)]


def launch_and_sum(launch, part, out):
    launch()
    triton_host.sum_splits(part, out)


def measure(B, S, Hq, Hkv, empty_us):
    """The floor row of one shape, then per tiles and splits the kernel alone and with the split sum."""
    D = 128
    kvb = 2 * B * S * Hkv * D * 2
    copy_us = bench_copy(kvb)
    q = torch.randn(B, 1, Hq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    params, bias = Params(D**-0.5), -math.log(S)
    out = torch.empty_like(q)
    _, pack, plan = triton_host.kvcache_plan(B, 1, Hq, Hkv, D, S, q.device)
    public_us = bench_graph(lambda: kernels.decode(q, k, v, params, bias, None, None, out=out))
    print(
        f"B{B} S{S} {Hq}/{Hkv}: {kvb / 1e6:.1f} MB, copy same bytes {copy_us:.1f} us ({kvb / copy_us / 1e3:.0f} GB/s), "
        f"public (plan {plan} splits) {public_us:.1f} us ({kvb / public_us / 1e3:.0f} GB/s)",
        flush=True,
    )
    shape = dict(batch=B, cache_len=S, heads=Hq, kv_heads=Hkv)
    rows = [
        dict(
            **shape,
            kind="floor",
            copy_us=copy_us,
            empty_us=empty_us,
            public_us=public_us,
            plan_splits=plan,
            kv_bytes=kvb,
        )
    ]
    rws = Rows(B, 1, S)
    for cfg in CONFIGS:
        for splits in (4, 8, 16, 32, 64, 128):
            if S // cfg.block_n // splits < 2:
                continue
            part = torch.empty(splits, *q.shape, dtype=torch.float32, device="cuda")
            launch = partial(
                triton_host.launch_forward,
                q,
                k,
                v,
                part,
                params,
                bias,
                None,
                rws,
                cfg,
                pack_gqa=pack,
                num_splits=splits,
            )
            m_us, b_us = bench_graph(launch), bench_graph(partial(launch_and_sum, launch, part, out))
            rows.append(
                dict(
                    **shape,
                    kind="split",
                    config=[cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages],
                    splits=splits,
                    main_us=m_us,
                    both_us=b_us,
                    gbps=kvb / b_us / 1e3,
                )
            )
            print(
                f"   {cfg.block_n},{cfg.num_stages} splits {splits:3d}: main {m_us:6.1f} us, "
                f"+sum {b_us:6.1f} us  {kvb / b_us / 1e3:6.0f} GB/s",
                flush=True,
            )
    return rows


def main() -> None:
    out_path = sys.argv[1]
    x = torch.zeros(1, device="cuda")
    empty_us = bench_graph(lambda: x.add_(1))
    print(f"empty kernel {empty_us:.1f} us", flush=True)
    rows = []
    for shape in SHAPES:
        rows += measure(*shape, empty_us)
        torch.cuda.empty_cache()  # the last shape's cache is garbage now
    write_result(out_path, rows)


if __name__ == "__main__":
    main()
