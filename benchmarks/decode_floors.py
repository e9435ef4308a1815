"""Decode floors and the split sum, on a GPU: python benchmarks/decode_floors.py BASELINE_FLASH_PY OUT.json.

Graph-replayed, one replay per timing, L2 flushed as ``sigattn bench --decode`` does: the public KV-cache call
of another flash.py (BASELINE_FLASH_PY, loaded as kernel_ab.py does) against this tree's, TMA loads on and
off, tiles / warps / splits of the kernel alone, a clean flush (a read) against the usual dirty one (a
write, whose lines the next kernel must write back), and two calls per graph (the cost of one more call).
Results: benchmarks/results/decode_small_batch_h100_2026-11-25.json, run against commit 09cbaf4's flash.py
(split sum looping over the splits) with this tree's split sum (every split loaded at once)."""

import math
import sys
from functools import partial

import torch

sys.path.insert(0, "benchmarks")
from graph_timing import bench_copy, bench_graph, write_result
from kernel_ab import load_baseline

from sigattn.ops.sigmoid_attn import kernels, triton_host
from sigattn.ops.sigmoid_attn.params import Params, Rows
from sigattn.ops.sigmoid_attn.triton_host import TileConfig

SHAPES = [  # (batch, cache length, heads, kv heads)
    (1, 8192, 32, 8),
    (1, 16384, 32, 8),
    (1, 32768, 32, 8),
    (4, 8192, 32, 8),
    (1, 8192, 32, 32),
    (1, 131072, 32, 8),
    (16, 32768, 32, 8),
    (64, 8192, 32, 32),
    (64, 32768, 32, 8),
]
CONFIGS = [
    TileConfig(16, 64, 4, 3),
    TileConfig(16, 64, 8, 3),
    TileConfig(16, 128, 4, 3),
    TileConfig(16, 128, 8, 3),
    TileConfig(16, 128, 8, 4),
]


def measure(head, B, S, Hq, Hkv):
    """One shape's row: the baseline's and this tree's public call, and at small batch the kernel's variants."""
    D = 128
    kvb = 2 * B * S * Hkv * D * 2
    copy_us, copy_clean = bench_copy(kvb), bench_copy(kvb, clean=True)
    q = torch.randn(B, 1, Hq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    params, bias = Params(D**-0.5), -math.log(S)
    hparams = head.flash_params(scale=D**-0.5, bias=-math.log(S), causal=False, window_size=(-1, -1))[0]
    out = torch.empty_like(q)
    tree = lambda: kernels.decode(q, k, v, params, bias, None, None, out=out)
    r = dict(batch=B, cache_len=S, heads=Hq, kv_heads=Hkv, kv_bytes=kvb, copy_us=copy_us, copy_clean_us=copy_clean)
    r["head_us"] = bench_graph(lambda: head.flash_kvcache_fwd(q, k, v, None, hparams, out=out))
    ref = head.flash_kvcache_fwd(q, k, v, None, hparams).float()
    # The public KV-cache call never loads by TMA (triton_host.decode passes use_tma=False, as flash_kvcache_fwd
    # did), so the flash.USE_TMA these two rows used to toggle changed nothing there: both time the same call.
    for tma in (False, True):
        r[f"tree_tma{int(tma)}_us"] = bench_graph(tree)
        r[f"tree_tma{int(tma)}_maxdiff"] = (
            (kernels.decode(q, k, v, params, bias, None, None).float() - ref).abs().max().item()
        )
    r["tree_clean_us"] = bench_graph(tree, clean=True)
    r["tree_x2_us"] = bench_graph(lambda: (tree(), tree()))
    print(
        " ".join(f"{kk}={vv:.1f}" if isinstance(vv, float) else f"{kk}={vv}" for kk, vv in r.items()),
        f"| GB/s head {kvb / r['head_us'] / 1e3:.0f} tree {kvb / r['tree_tma1_us'] / 1e3:.0f} "
        f"copy {kvb / copy_us / 1e3:.0f}",
        flush=True,
    )
    r["variants"] = []
    if B * S <= 32768 and Hkv == 8:
        _, pack, _ = triton_host.kvcache_plan(B, 1, Hq, Hkv, D, S, q.device)
        rws = Rows(B, 1, S)
        for cfg in CONFIGS:
            for splits in (8, 16, 32):
                for tma in (False, True):
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
                        use_tma=tma,
                    )
                    us = bench_graph(launch, n=100)
                    r["variants"].append(
                        dict(
                            config=[cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages],
                            splits=splits,
                            tma=tma,
                            main_us=us,
                        )
                    )
                    print(
                        f"   main {cfg.block_n},{cfg.num_warps}w,{cfg.num_stages}s splits {splits:3d} "
                        f"tma {int(tma)}: {us:6.1f} us",
                        flush=True,
                    )
    return r


def main() -> None:
    head = load_baseline(sys.argv[1])
    out_path = sys.argv[2]
    x = torch.zeros(1, device="cuda")
    add = lambda: x.add_(1)
    print(f"empty {bench_graph(add):.1f} us, clean flush {bench_graph(add, clean=True):.1f} us")
    rows = []
    for shape in SHAPES:
        rows.append(measure(head, *shape))
        torch.cuda.empty_cache()  # the last shape's cache is garbage now
    write_result(out_path, rows)


if __name__ == "__main__":
    main()
