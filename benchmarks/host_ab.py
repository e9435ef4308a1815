"""Host time per public call, this tree against another tree's, on a GPU, interleaved:
python benchmarks/host_ab.py --baseline OTHER_ROOT [--rounds 5] [--stub-launches] --json PATH.

Calls whose kernels take less time than Python takes to issue them (decode, short or windowed rows) are
bound by the host: a change to the dispatch shows there, not in the kernels. Per case, ``host_us`` is the
time to issue 300 back-to-back calls before the one synchronisation at the end (as in host_overhead.py),
the best of 5 loops; the rounds are ``ab_rounds.interleave``'s (a row: the median over rounds). OTHER_ROOT
holds the other ``sigattn`` package (``git archive OLD sigattn | tar -x -C OTHER_ROOT``).

``--stub-launches`` needs no GPU: CPU tensors on the ``triton`` backend (Triton's interpreter mode), with
every Triton kernel object replaced by one whose launch does nothing, so what is timed is the Python above
the kernels (validation, dispatch, autograd, argument packing). Where the kernels live is found by name in
either tree's layout. The Gluon kernels never run on the CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ab_rounds import interleave, write_json

KERNEL_MODULES = ("sigattn.ops.sigmoid_attn.triton_host", "sigattn.ops.sigmoid_attn.flash")  # new, old layout
KERNELS = (
    "sigmoid_attn_fwd_kernel",
    "sigmoid_attn_bwd_kernel_dkdv",
    "sigmoid_attn_bwd_kernel_dq",
    "sigmoid_attn_sum_splits_kernel",
)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_launches() -> None:
    """Every Triton kernel of this tree's launchers replaced by one that launches nothing."""
    import importlib

    for name in KERNEL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for kernel in KERNELS:
            if hasattr(module, kernel):
                setattr(module, kernel, _NoLaunch())
        return


def cases(device: str):
    """(name, call): the host-bound calls of benchmarks/tree_ab.py, forward only, and a backward."""
    import torch

    import sigattn

    def qkv(batch, seqlen, heads, grad=False):
        return [
            torch.randn(batch, seqlen, heads, 128, device=device, dtype=torch.bfloat16, requires_grad=grad)
            for _ in range(3)
        ]

    q, k, v = qkv(4, 2001, 16)
    qw, kw, vw = qkv(4, 4096, 16)
    qg, kg, vg = qkv(1, 512, 16, grad=True)
    out = sigattn.sigmoid_attn_func(qg, kg, vg, causal=True)
    dout = torch.randn_like(out)
    qd = torch.randn(8, 1, 32, 128, device=device, dtype=torch.bfloat16)
    caches = {n: [torch.randn(8, n, 8, 128, device=device, dtype=torch.bfloat16) for _ in "kv"] for n in (1024, 8192)}
    lengths = {n: torch.full((8,), n - 3, dtype=torch.int32, device=device) for n in caches}

    def decode(n):
        return lambda: sigattn.sigmoid_attn_with_kvcache(qd, *caches[n], cache_seqlens=lengths[n])

    return [
        ("dense-D128-full-2001 fwd", lambda: sigattn.sigmoid_attn_func(q, k, v)),
        ("window-D128-(512,0)-4096 fwd", lambda: sigattn.sigmoid_attn_func(qw, kw, vw, window_size=(512, 0))),
        ("dense-D128-causal-512 bwd", lambda: torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)),
        *((f"decode-B8-Hq32-Hkv8-D128-{n} fwd", decode(n)) for n in caches),
    ]


def host_us(call, synchronize) -> float:
    """Microseconds to issue one call: the best of 5 loops of 300 back-to-back calls, synchronised between
    loops (after 20 calls of warm-up)."""
    for _ in range(20):
        call()
    synchronize()
    loops = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(300):
            call()
        loops.append((time.perf_counter() - start) / 300 * 1e6)
        synchronize()
    return min(loops)


def worker(path: str, stub: bool) -> None:
    import torch

    import sigattn

    if stub:
        stub_launches()
    synchronize = (lambda: None) if stub else torch.cuda.synchronize
    rows = [{"case": name, "host_us": host_us(call, synchronize)} for name, call in cases("cpu" if stub else "cuda")]
    Path(path).write_text(json.dumps({"sigattn": sigattn.__file__, "rows": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="a folder holding the other tree's sigattn package")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write {meta, rows} here")
    parser.add_argument("--stub-launches", action="store_true", help="time the Python above the kernels, on the CPU")
    parser.add_argument("--worker", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.stub_launches)
        return
    # The interpreter's mode lets CPU tensors through the 'triton' backend.
    stub = dict(TRITON_INTERPRET="1", SIGATTN_BACKEND="triton") if args.stub_launches else None
    worker_args = ["--stub-launches"] if args.stub_launches else []
    rows = interleave(
        __file__, args.baseline, args.rounds, worker_args, key=("case",), value="host_us", unit="us", env=stub
    )
    for row in rows:
        base, this = row["baseline_us"], row["this_us"]
        print(f"{row['case']:36s} baseline {base:7.1f} us  this {this:7.1f} us  ratio {this / base:.3f}")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
