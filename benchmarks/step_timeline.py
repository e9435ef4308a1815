"""Where one call's GPU time goes, kernel by kernel, in each of `sigattn bench`'s modes:
python benchmarks/step_timeline.py [--shapes 128:2048:causal ...] [--providers sigattn sdpa-cudnn] --json PATH.

The bench's shapes (16k tokens, hidden 2048, bf16), providers and timed calls. Per provider, shape and
mode: the do_bench median, and from torch.profiler the kernels of the last of six profiled calls, each as
(name, start, duration) in µs from the end of a marker kernel launched just before the call (a 256 MiB
in-place bitwise not, which also clears L2 as do_bench does). A kernel that starts late shows the host
falling behind; comparing fwd + bwd with the sum of the two shows what one costs the other.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from sigattn.bench import sweep
from sigattn.runinfo import run_meta

PROFILED_CALLS = 6


def kernels_of_last_call(fn, grads: list[torch.Tensor]) -> list[tuple[str, float, float]]:
    marker = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            marker.bitwise_not_()
            fn()
            for t in grads:
                t.grad = None
        torch.cuda.synchronize()
    events = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start
    )
    start = max(i for i, e in enumerate(events) if "bitwise_not" in e.name.lower() or "BitwiseNot" in e.name)
    t0 = events[start].time_range.end
    return [
        (e.name[:80], round(e.time_range.start - t0, 1), round(e.time_range.end - e.time_range.start, 1))
        for e in events[start + 1 :]
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["128:2048:causal", "128:2048:full", "128:4096:causal"])
    parser.add_argument("--providers", nargs="+", choices=list(sweep.PROVIDERS), default=["sigattn"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = {"meta": run_meta(" ".join(["python", *sys.argv])), "runs": {}}
    for name, spec in [(name, spec) for name in args.providers for spec in args.shapes]:
        head_dim, seqlen, mask = spec.split(":")
        (shape,) = sweep.sweep_shapes([int(head_dim)], [int(seqlen)], [mask == "causal"], "bf16")
        provider = sweep.PROVIDERS[name]
        attn = provider.build(shape)
        rows = result["runs"].setdefault(name, {})[spec] = {}
        for mode in sweep.MODES:
            inputs = sweep.make_inputs(provider.layout, shape)
            fn = sweep.timed_call(attn, inputs, mode)
            ms = triton.testing.do_bench(fn, grad_to_none=inputs, warmup=250, rep=1000, return_mode="median")
            rows[mode] = {"do_bench_us": round(ms * 1e3, 1), "kernels": kernels_of_last_call(fn, inputs)}
            print(name, spec, mode, rows[mode]["do_bench_us"], "us:", rows[mode]["kernels"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
