"""Sweep the KV-cache forward's tiles and key splits on a GPU: python benchmarks/tune_decode.py --json PATH.

Decode (one query per row), bf16, D = 128, contiguous cache, on shapes from the four corners of
``sigattn bench --decode``. For each tile config (block_m cap, block_n, warps, stages), every power-of-two
number of splits is timed, and the launcher's own plan (``kvcache_plan``) beside them; GB/s = bytes of K and
V read per second. The winners go into KVCACHE_CONFIGS in sigattn/ops/sigmoid_attn/triton_host.py, citing the
JSON this writes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from functools import partial

import torch
import triton

from sigattn.ops.sigmoid_attn import kernels, triton_host
from sigattn.ops.sigmoid_attn.params import Params
from sigattn.runinfo import run_meta

SHAPES = [(1, 131072, 32, 8), (4, 32768, 32, 8), (16, 8192, 32, 8), (64, 8192, 32, 32), (1, 8192, 32, 32)]
CANDIDATES = [(64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4), (64, 128, 8, 3), (64, 64, 2, 3)]
SPLITS = [1, 2, 4, 8, 16, 32, 64, 128]
HEAD_DIM = 128
# --paged: page sizes against tile widths (a tile spans several pages when block_n > page size)
PAGED_SHAPES = [(4, 32768, 32, 8), (16, 65536, 32, 8)]
PAGE_SIZES = [16, 64, 256]
PAGED_CANDIDATES = [(64, 64, 4, 3), (64, 16, 4, 4), (64, 32, 4, 4), (64, 128, 4, 3)]


_TABLES = (
    triton_host.KVCACHE_CONFIGS,
    triton_host.KVCACHE_MANY_PROGRAMS_CONFIGS,
    triton_host.KVCACHE_SHORT_MANY_PROGRAMS_CONFIGS,
    triton_host.KVCACHE_PAGED_CONFIGS,
)
_DEFAULTS = tuple(table[HEAD_DIM] for table in _TABLES)


def _use_config(cand: tuple | None) -> None:
    """Every contiguous-cache plan (few programs or many) and the paged one run on tiles ``cand``; None
    restores the launcher's tables."""
    configs = _DEFAULTS if cand is None else (triton_host.TileConfig(*cand),) * len(_TABLES)
    for table, config in zip(_TABLES, configs, strict=True):
        table[HEAD_DIM] = config


def tune_paged(params, bias) -> list[dict]:
    """Contiguous and paged caches (pages shuffled) at the launcher's split plan."""
    rows = []
    for batch, cache_len, heads, kv_heads in PAGED_SHAPES:
        q = torch.randn(batch, 1, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch * cache_len, kv_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in "kv")
        lens = torch.full((batch,), cache_len, dtype=torch.int32, device="cuda")
        gbytes = 2 * k.numel() * k.element_size() / 1e9
        for cand, page in [(c, p) for c in PAGED_CANDIDATES for p in [0, *PAGE_SIZES]]:
            _use_config(cand)
            if page:
                pages = batch * cache_len // page
                kc, vc = k.view(pages, page, kv_heads, HEAD_DIM), v.view(pages, page, kv_heads, HEAD_DIM)
                table = torch.randperm(pages, device="cuda").reshape(batch, -1).to(torch.int32)
            else:
                kc, vc = k.view(batch, cache_len, kv_heads, HEAD_DIM), v.view(batch, cache_len, kv_heads, HEAD_DIM)
                table = None
            step = partial(kernels.decode, q, kc, vc, params, bias, None, lens, table)
            ms = triton.testing.do_bench(step, return_mode="median")
            rows.append(
                dict(
                    batch=batch,
                    cache_len=cache_len,
                    heads=heads,
                    kv_heads=kv_heads,
                    config=cand,
                    page_size=page,
                    ms=ms,
                    gbps=gbytes / (ms * 1e-3),
                )
            )
            print(f"B{batch} L{cache_len} {cand} page={page}: {rows[-1]['gbps']:.0f} GB/s", flush=True)
    _use_config(None)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--paged", action="store_true", help="tile widths against page sizes instead")
    args = parser.parse_args()
    rows = []
    params, bias = Params(HEAD_DIM**-0.5), -8.0
    if args.paged:
        rows = tune_paged(params, bias)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": run_meta(" ".join(["python", *sys.argv])), "rows": rows}, f, indent=1)
        return
    for batch, cache_len, heads, kv_heads in SHAPES:
        q = torch.randn(batch, 1, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, cache_len, kv_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in "kv")
        lens = torch.full((batch,), cache_len, dtype=torch.int32, device="cuda")
        gbytes = 2 * k.numel() * k.element_size() / 1e9
        for cand in CANDIDATES:
            _use_config(cand)
            planned = triton_host.kvcache_plan(batch, 1, heads, kv_heads, HEAD_DIM, cache_len, q.device)[2]
            for splits in [*SPLITS, None]:
                try:
                    step = partial(kernels.decode, q, k, v, params, bias, None, lens, num_splits=splits)
                    ms = triton.testing.do_bench(step, return_mode="median")
                except Exception as e:  # out of shared memory or registers: record and go on
                    ms = math.nan
                    print(f"  {cand} splits={splits}: {type(e).__name__}: {str(e)[:120]}")
                rows.append(
                    dict(
                        batch=batch,
                        cache_len=cache_len,
                        heads=heads,
                        kv_heads=kv_heads,
                        config=cand,
                        splits=splits if splits is not None else f"plan={planned}",
                        ms=ms,
                        gbps=gbytes / (ms * 1e-3),
                    )
                )
                print(
                    f"B{batch} L{cache_len} {heads}/{kv_heads} {cand} splits={rows[-1]['splits']}: "
                    f"{ms * 1e3:.1f} us {rows[-1]['gbps']:.0f} GB/s",
                    flush=True,
                )
        _use_config(None)
    best = {}
    for r in rows:
        key = f"B{r['batch']}-L{r['cache_len']}-{r['heads']}/{r['kv_heads']}"
        if not math.isnan(r["ms"]) and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    print("\nbest:")
    for key, r in best.items():
        print(f"  {key:22s} {r['config']} splits={r['splits']} {r['gbps']:.0f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": run_meta(" ".join(["python", *sys.argv])), "rows": rows, "best": best}, f, indent=1)


if __name__ == "__main__":
    main()
