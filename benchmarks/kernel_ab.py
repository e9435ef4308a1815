"""The kernels of this tree (``kernels.py``, tiles in ``triton_host.py``) against those in another flash.py,
on a GPU:
python benchmarks/kernel_ab.py --baseline OLD_FLASH_PY [--modes fwd bwd] [--tune-json TUNE.json ...]
[--head-dims 64 128] [--seqlens 1024 4096 16384] --json PATH.

``sigattn bench``'s shapes (16k tokens, hidden 2048, bf16), head dims 64 and 128, causal and full; medians of
triton.testing.do_bench, the two versions interleaved three times, so that clock drift hits both. Each
version runs with its own tile tables; with --tune-json (written by tune_tiles.py for this tree) this tree's
kernels run with the best tiles found there instead. The other flash.py, from before the kernels moved to
kernels.py, runs through its own ``flash_params``/``flash_fwd``/``flash_bwd``; its relative imports find this
tree's hopper, hopper_bwd and host, so a version that dispatches to the Gluon kernels through their old names
(hopper.runs_on_sm90, as the last monolithic flash.py did) cannot run fwd or bwd here.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from functools import partial
from pathlib import Path

import torch
import triton

from sigattn.ops.sigmoid_attn import kernels, triton_host
from sigattn.ops.sigmoid_attn.params import Params
from sigattn.ops.sigmoid_attn.reference import Mask, resolve_bias
from sigattn.runinfo import run_meta


def load_baseline(path: str):
    """The other flash.py as a module; its torch.library ops get another namespace so both can be loaded."""
    source = Path(path).read_text().replace('"sigattn::', '"sigattn_baseline::')
    spec = importlib.util.spec_from_loader("baseline_flash", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "sigattn.ops.sigmoid_attn"  # its relative imports: this tree's hopper, hopper_bwd, host
    module.__file__ = path  # triton's jit reads kernel source through inspect, which needs a file
    sys.modules["baseline_flash"] = module
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def baseline_call(module, mode, q, k, v, do, causal):
    """The call of ``mode`` on the other flash.py, through its own launchers."""
    params, _ = module.flash_params(scale=q.shape[-1] ** -0.5, bias=None, causal=causal, window_size=(-1, -1))
    if mode == "fwd":
        return partial(module.flash_fwd, q, k, v, params)
    return partial(module.flash_bwd, do, q, k, v, params)


def this_call(mode, q, k, v, do, causal):
    """The call of ``mode`` on this tree's kernels (dense rows take the bias resolved, as the public functions
    pass it)."""
    params, bias = Params(q.shape[-1] ** -0.5, Mask(causal=causal)), resolve_bias(None, k.shape[1])
    if mode == "fwd":
        return partial(kernels.forward, q, k, v, params, bias)
    return partial(kernels.backward, do, q, k, v, params, bias)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--modes", nargs="+", choices=["fwd", "bwd"], default=["fwd"])
    parser.add_argument("--tune-json", nargs="*", default=[])
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--seqlens", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    baseline = load_baseline(args.baseline)
    versions = {"baseline": (baseline, partial(baseline_call, baseline)), "this": (triton_host, this_call)}
    tables = {"fwd": "FWD_CONFIGS", "dkdv": "BWD_DKDV_CONFIGS", "dq": "BWD_DQ_CONFIGS"}
    for tune_json in args.tune_json:
        for key, row in json.loads(Path(tune_json).read_text())["best"].items():
            kernel, dim, mask = key.split("-")
            table = getattr(triton_host, tables[kernel])
            table[(int(dim[1:]), mask == "causal")] = triton_host.TileConfig(*row["config"])
    rows = []
    shapes = [(d, c, s) for d in args.head_dims for c in (False, True) for s in args.seqlens]
    for head_dim, causal, seqlen in shapes:
        batch, heads = 16384 // seqlen, 2048 // head_dim
        q, k, v, do = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in "qkvo")
        pairs = seqlen * (seqlen + 1) / 2 if causal else seqlen * seqlen
        work = {"fwd": 4 * batch * heads * pairs * head_dim, "bwd": 10 * batch * heads * pairs * head_dim}
        for mode in args.modes:
            outs = {}
            for _ in range(3):
                for name, (module, call) in versions.items():
                    fn = call(mode, q, k, v, do, causal)
                    outs[name] = fn()
                    ms = triton.testing.do_bench(fn, return_mode="median")
                    configs = [
                        getattr(module, tables[kernel])[(head_dim, causal)]
                        for kernel in (["fwd"] if mode == "fwd" else ["dkdv", "dq"])
                    ]
                    rows.append(
                        dict(
                            kernel=name,
                            mode=mode,
                            head_dim=head_dim,
                            causal=causal,
                            seqlen=seqlen,
                            ms=ms,
                            tflops=work[mode] / ms * 1e-9,
                            configs=[list(dataclasses.astuple(c)) for c in configs],
                        )
                    )
                    print(
                        f"{mode} D{head_dim} causal={causal} S={seqlen} {name}: {rows[-1]['tflops']:.0f} TFLOP/s",
                        flush=True,
                    )
            this, base = outs["this"], outs["baseline"]
            this, base = (this, base) if mode == "fwd" else (torch.cat(this[:3]), torch.cat(base[:3]))
            print(f"  max |this - baseline| = {(this.float() - base.float()).abs().max().item():.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": run_meta(" ".join(["python", *sys.argv])), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
