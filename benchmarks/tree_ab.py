"""The public functions of this tree against another tree's on a GPU, interleaved:
python benchmarks/tree_ab.py --baseline OTHER_ROOT [--rounds 2] [--cases REGEX] [--this-env NAME=VALUE] --json PATH.

OTHER_ROOT holds another version of the ``sigattn`` package (e.g. ``git archive OLD sigattn | tar -x -C
OTHER_ROOT``). The rounds are ``ab_rounds.interleave``'s (a row: the median over rounds of each tree's
``triton.testing.do_bench`` median; the ratio this tree's time over the baseline's, below 1 faster).

The cases are the paths a change to the kernels' masking can move: the headline dense shapes of ``sigattn
bench`` (16k tokens, hidden 2048, bf16) on the sm_90 kernels, lengths that end inside tiles, packed sequences,
causal sliding windows of 256-4096 keys at 4k and 16k tokens, ALiBi, attention dropout (the Triton kernels)
and KV-cache decode.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from pathlib import Path

from ab_rounds import interleave, write_json

TOKENS, HIDDEN = 16384, 2048


def cases():
    """(name, mode, builder): builder() returns the call to time."""
    import torch

    import sigattn

    def dense(seqlen, head_dim, backward, **options):
        def build():
            batch, heads = max(TOKENS // seqlen, 1), HIDDEN // head_dim
            q, k, v = (
                torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                for _ in range(3)
            )
            if not backward:
                return lambda: sigattn.sigmoid_attn_func(q, k, v, **options)
            out = sigattn.sigmoid_attn_func(q, k, v, **options)
            dout = torch.randn_like(out)
            return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

        return build

    def varlen(lengths, backward):
        def build():
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
            q, k, v = (
                torch.randn(sum(lengths), 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                for _ in range(3)
            )
            call = lambda: sigattn.sigmoid_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)  # noqa: E731
            if not backward:
                return call
            out = call()
            dout = torch.randn_like(out)
            return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

        return build

    def decode(cache_len):
        def build():
            k_cache, v_cache = (torch.randn(8, cache_len, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in "kv")
            q = torch.randn(8, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
            lengths = torch.full((8,), cache_len - 3, dtype=torch.int32, device="cuda")
            return lambda: sigattn.sigmoid_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)

        return build

    mixed = [3000, 517, 1, 1800, 4096, 777, 2048, 1024, 3119]
    out = []
    for backward in (False, True):
        mode = "bwd" if backward else "fwd"
        for head_dim, seqlen, causal in (
            (128, 2048, False),
            (128, 16384, False),
            (128, 2048, True),
            (128, 16384, True),
            (64, 16384, False),
            (64, 16384, True),
        ):
            mask = "causal" if causal else "full"
            out.append((f"dense-D{head_dim}-{mask}-{seqlen}", mode, dense(seqlen, head_dim, backward, causal=causal)))
        out.append(("dense-D128-causal-2001 (ends inside tiles)", mode, dense(2001, 128, backward, causal=True)))
        out.append(("dense-D128-full-2001 (ends inside tiles)", mode, dense(2001, 128, backward)))
        for head_dim, seqlen in ((128, 4096), (128, 16384), (64, 16384)):
            slopes = torch.rand(HIDDEN // head_dim, device="cuda")
            case = dense(seqlen, head_dim, backward, causal=True, alibi_slopes=slopes)
            out.append((f"alibi-D{head_dim}-causal-{seqlen}", mode, case))
        for seqlen, window in itertools.product((4096, 16384), (256, 1024, 4096)):
            if window < seqlen:
                case = dense(seqlen, 128, backward, window_size=(window, 0))
                out.append((f"window-D128-({window},0)-{seqlen}", mode, case))
        for head_dim, seqlen, causal in ((128, 16384, True), (64, 16384, True), (128, 2048, False)):
            mask = "causal" if causal else "full"
            case = dense(seqlen, head_dim, backward, causal=causal, dropout_p=0.1)
            out.append((f"dropout-0.1-D{head_dim}-{mask}-{seqlen}", mode, case))
        out.append(("varlen-D128-causal-16x1k", mode, varlen([1024] * 16, backward)))
        out.append(("varlen-D128-causal-mixed", mode, varlen(mixed, backward)))
    out += [(f"decode-B8-Hq32-Hkv8-D128-{n}", "fwd", decode(n)) for n in (1024, 8192, 65536)]
    return out


def worker(path: str, pattern: str) -> None:
    import torch
    import triton

    import sigattn

    rows = []
    for name, mode, build in cases():
        if not re.search(pattern, name):
            continue
        call = build()
        rows.append({"case": name, "mode": mode, "ms": triton.testing.do_bench(call, warmup=50, rep=300)})
        del call
        torch.cuda.empty_cache()
    Path(path).write_text(json.dumps({"sigattn": sigattn.__file__, "rows": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="a folder holding the other tree's sigattn package")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", default="", help="only the cases whose name matches this regex")
    parser.add_argument("--json", help="write {meta, rows} here")
    parser.add_argument(
        "--this-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set for this tree's runs only (repeatable): with --baseline . the same tree under another setting",
    )
    parser.add_argument("--worker", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.cases)
        return
    worker_args = ["--cases", args.cases]
    this_env = dict(item.split("=", 1) for item in args.this_env)
    key = ("case", "mode")
    rows = interleave(__file__, args.baseline, args.rounds, worker_args, key, value="ms", unit="ms", this_env=this_env)
    rows.sort(key=lambda row: (row["mode"], row["case"]))
    for row in rows:
        base, this = row["baseline_ms"], row["this_ms"]
        print(
            f"{row['mode']:4s} {row['case']:45s} baseline {base:8.3f} ms  this {this:8.3f} ms  ratio {this / base:.3f}"
        )
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
