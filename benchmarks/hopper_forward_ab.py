"""Configurations of the Gluon forward (hopper.py) at one head dim, on a GPU: each checked against float64
on the check grid's rule, then timed through the public function against the Triton forward and SDPA's
FlashAttention-2 and cuDNN, interleaved so that clock drift hits every provider:
python benchmarks/hopper_forward_ab.py --head-dim 64 --configs 2:128:3 3:64:4 [--seqlens ...] --json PATH.

A configuration is CONSUMERS:BLOCK_N:STAGES (``hopper.ForwardConfig``). Shapes are ``sigattn bench``'s
(16k tokens, hidden 2048, bf16, causal and full); TFLOP/s count the unmasked area, as the bench does.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from triton.testing import do_bench

from sigattn.bench import sweep
from sigattn.ops.sigmoid_attn import hopper
from sigattn.runinfo import run_meta
from sigattn.testing.grid import Case, run_case

CHECK_CASES = [  # B, Sq, Sk, H, Hkv, extra options
    (2, 113, 203, 8, 2, {}),
    (2, 203, 113, 8, 2, dict(causal=True)),
    (2, 1023, 1023, 8, 8, dict(causal=True)),
    (1, 1, 1023, 4, 1, dict(causal=True)),
    (2, 300, 17, 4, 4, dict(causal=True, top_left=True)),
    (2, 2048, 2048, 4, 2, dict(causal=True, dtype="float16")),
    (2, 257, 1000, 8, 2, dict(head_bias=True)),
    (1, 17, 17, 2, 2, {}),
]


def use_config(head_dim: int, config: hopper.ForwardConfig | None) -> None:
    """The forward at ``head_dim`` runs with ``config``; None leaves that head dim to the Triton kernel."""
    dims = tuple(sorted({d for d, _ in hopper.CONFIGS} | {head_dim}))
    hopper.HEAD_DIMS = tuple(d for d in dims if d != head_dim) if config is None else dims
    for causal in (False, True):
        hopper.CONFIGS[(head_dim, causal)] = config


def check(head_dim: int, configs: dict[str, hopper.ForwardConfig]) -> list[dict]:
    rows = []
    for name, config in configs.items():
        use_config(head_dim, config)
        for b, sq, sk, h, hkv, extra in CHECK_CASES:
            row = run_case(Case(b, sq, sk, h, hkv, head_dim, **extra), "cuda")
            row["config"] = name
            row["ok"] &= row["forward_kernel"] == "gluon-sm90"
            verdict = "ok  " if row["ok"] else "FAIL"
            print(f"{verdict} {name} {row['id']} out {row['out_err']:.2e}/{row['out_pt_err']:.2e}", flush=True)
            rows.append(row)
    return rows


def timed(attn, config_of_call):
    """The forward of ``attn`` with the Gluon configuration ``config_of_call`` (a thunk) in force."""

    def call(q, k, v):
        config_of_call()
        return attn(q, k, v)

    return call


def bench(head_dim: int, configs: dict[str, hopper.ForwardConfig], seqlens: list[int], rounds: int) -> list[dict]:
    rows = []
    for causal in (False, True):
        for seqlen in seqlens:
            (shape,) = sweep.sweep_shapes([head_dim], [seqlen], [causal], "bf16")
            flops = sweep.attention_flops(shape, "fwd")
            ours = sweep.PROVIDERS["sigattn"].build(shape)
            calls = {name: ("bshd", timed(ours, lambda c=c: use_config(head_dim, c))) for name, c in configs.items()}
            calls["triton"] = ("bshd", timed(ours, lambda: use_config(head_dim, None)))
            for provider in ("sdpa-flash", "sdpa-cudnn"):
                calls[provider] = (sweep.PROVIDERS[provider].layout, sweep.PROVIDERS[provider].build(shape))
            inputs = {layout: sweep.make_inputs(layout, shape) for layout in ("bshd", "bhsd")}
            row = dict(headdim=head_dim, causal=causal, seqlen=seqlen, tflops={})
            steps = {name: sweep.timed_call(attn, inputs[layout], "fwd") for name, (layout, attn) in calls.items()}
            for step in steps.values():  # compiled before timing: do_bench sizes its loops on a first call
                step()
            for _ in range(rounds):
                for name, step in steps.items():
                    ms = do_bench(step, warmup=100, rep=100, return_mode="median")
                    row["tflops"].setdefault(name, []).append(round(flops / ms / 1e9, 1))
            best = {name: max(t) for name, t in row["tflops"].items()}
            fa2 = best["sdpa-flash"]
            print(
                f"D{head_dim} {'causal' if causal else 'full'} {seqlen}: "
                + " ".join(f"{n}={t:.0f}({t / fa2:.2f}x FA2)" for n, t in best.items()),
                flush=True,
            )
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--configs", nargs="+", required=True, help="CONSUMERS:BLOCK_N:STAGES")
    parser.add_argument("--seqlens", nargs="+", type=int, default=[1024, 2048, 4096, 16384])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    configs = {c: hopper.ForwardConfig(*map(int, c.split(":"))) for c in args.configs}
    result = {"meta": run_meta(" ".join(["python", *sys.argv]))}
    if not args.skip_check:
        result["check"] = check(args.head_dim, configs)
        print("check failures:", [(r["config"], r["id"]) for r in result["check"] if not r["ok"]], flush=True)
    if not args.skip_bench:
        result["bench"] = bench(args.head_dim, configs, args.seqlens, args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
