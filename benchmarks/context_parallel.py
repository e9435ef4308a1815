"""Context-parallel sigmoid attention on N GPUs: tokens/s and peak memory per GPU against sequence length,
for ring and Ulysses attention (``sigattn.distributed``), with one GPU on the whole sequence as the baseline.

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 8 benchmarks/context_parallel.py \\
        --json benchmarks/results/context_parallel_8gpu.json --plot benchmarks/results/context_parallel_8gpu.png

Setup: batch 1, 32 query heads, 8 key/value heads (GQA, Llama-3-8B's attention), head dim 128, bf16,
global sequence lengths 16k to 256k split over the N ranks; causal (ring in the zig-zag layout) and
full masks; forward (a training forward: inputs require grad) and forward + backward. Providers:

    ring        ring_sigmoid_attn: K/V shards around the ring, P2P overlapped with compute
    ulysses     ulysses_sigmoid_attn: all-to-all to head shards and back
    single-gpu  sigmoid_attn_func on the whole sequence, every rank on its own (no communication): the
                work the group shares, so ideal scaling is N x its tokens/s

Each (provider, mask, layout, seqlen, mode) runs ``--warmup`` calls, then ``--iters`` calls timed one by one
with CUDA events; ``ms`` is the slowest rank's median (the group waits for it). ``tokens_per_s`` is
B * S / ms (the whole sequence, the group's throughput); ``tflops_per_gpu`` counts the unmasked pairs of
the whole sequence (forward 4 * B * Hq * pairs * D, backward 2.5 x, forward + backward 3.5 x) divided by
the GPUs sharing them. ``peak_mem_mb`` is the largest, over ranks, of ``torch.cuda.max_memory_allocated``
during one call less what was allocated before it (the inputs and the output gradient).

JSON: ``{"meta": {"device", "torch", "triton", "python", "cuda", "date", "command", "git_commit",
"world_size", "backend"}, "rows": [{"provider", "mode", "mask", "layout", "batch", "heads", "kv_heads", "headdim",
"seqlen", "seqlen_local", "dtype", "world_size", "ms", "tokens_per_s", "tflops_per_gpu", "peak_mem_mb"}],
"skips": [...]}``, rewritten after every measurement so a run that dies keeps what it measured. A
measurement that fails on every rank (out of memory) becomes a skip and the longer lengths of that
provider are not tried; a failure on some ranks only leaves the others waiting in a collective until the
process group's timeout (``--timeout``) ends the run.

NVLink multicast (NVLS) stays off: the script sets NCCL_NVLS_ENABLE=0 (and the PyTorch / NVSHMEM
equivalents) unless the environment already sets them; the lender's machines require it.

``--device cpu`` runs the same sweep on the CPU with gloo (timed with ``time.perf_counter``, no memory
column): a smoke test of the script, e.g. ``torchrun --nproc-per-node 2 benchmarks/context_parallel.py
--device cpu --seqlens 256 512 --heads 4 --kv-heads 2 --headdim 32 --dtype fp32 --iters 2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

for _name, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_name, _value)  # before torch.distributed creates any communicator

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from sigattn import sigmoid_attn_func  # noqa: E402
from sigattn.distributed import ring_sigmoid_attn, ulysses_sigmoid_attn  # noqa: E402
from sigattn.runinfo import run_meta, write_json  # noqa: E402

PROVIDERS = ("ring", "ulysses", "single-gpu")
MODES = ("fwd", "fwd+bwd")
FLOPS_PER_FORWARD = {"fwd": 1.0, "fwd+bwd": 3.5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SEQLENS = (16384, 32768, 65536, 131072, 262144)


@dataclasses.dataclass(frozen=True)
class Config:
    provider: str
    mask: str  # "causal" or "full"
    layout: str  # "zigzag" or "contiguous" (how the sequence is sharded; "-" for single-gpu)
    batch: int
    heads: int
    kv_heads: int
    headdim: int
    seqlen: int  # of the whole sequence
    dtype: str
    world_size: int

    @property
    def seqlen_local(self) -> int:
        return self.seqlen if self.provider == "single-gpu" else self.seqlen // self.world_size


def attention_flops(c: Config, mode: str) -> float:
    pairs = c.seqlen * (c.seqlen + 1) / 2 if c.mask == "causal" else c.seqlen * c.seqlen
    return 4 * c.batch * c.heads * pairs * c.headdim * FLOPS_PER_FORWARD[mode]


def make_attention(c: Config):
    causal = c.mask == "causal"
    if c.provider == "single-gpu":
        return lambda q, k, v: sigmoid_attn_func(q, k, v, causal=causal)
    fn = ring_sigmoid_attn if c.provider == "ring" else ulysses_sigmoid_attn
    return lambda q, k, v: fn(q, k, v, causal=causal, load_balance=c.layout == "zigzag")


class Timer:
    """Times one call: CUDA events on the GPU, the wall clock (after the call) on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, step) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        step()
        return (time.perf_counter() - begin) * 1e3


def measure(c: Config, mode: str, args, device: torch.device) -> tuple[float, float | None]:
    """(this rank's median ms, peak MiB beyond what was allocated before the call or None on the CPU)."""
    dtype = DTYPES[c.dtype]
    q = torch.randn(c.batch, c.seqlen_local, c.heads, c.headdim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(c.batch, c.seqlen_local, c.kv_heads, c.headdim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    dout = torch.randn_like(q)
    attn = make_attention(c)

    def step():
        for t in (q, k, v):
            t.grad = None
        out = attn(q, k, v)
        if mode == "fwd+bwd":
            out.backward(dout)

    timer = Timer(device)
    for _ in range(args.warmup):
        step()
    dist.barrier()
    ms = statistics.median(timer(step) for _ in range(args.iters))
    if device.type != "cuda":
        return ms, None
    for t in (q, k, v):
        t.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - before) / 2**20


def group_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def make_row(c: Config, mode: str, ms: float, peak_mib: float | None) -> dict:
    gpus = 1 if c.provider == "single-gpu" else c.world_size
    row = dataclasses.asdict(c)
    row.update(
        mode=mode,
        seqlen_local=c.seqlen_local,
        ms=round(ms, 4),
        tokens_per_s=round(c.batch * c.seqlen / (ms * 1e-3), 1),
        tflops_per_gpu=round(attention_flops(c, mode) / gpus / (ms * 1e-3) / 1e12, 2),
        peak_mem_mb=round(peak_mib, 1) if peak_mib is not None else None,
    )
    return row


def configs(args, world_size: int) -> list[list[Config]]:
    """One list per (provider, mask, layout), in increasing seqlen (a failure skips the rest of its list)."""
    series = []
    for provider in args.providers:
        for mask in args.masks:
            layouts = ["-"] if provider == "single-gpu" else args.layouts
            if provider == "ulysses" or mask == "full":
                layouts = layouts[:1]  # the same work in either layout: only the ring's causal steps differ
            for layout in layouts:
                series.append(
                    [
                        Config(
                            provider,
                            mask,
                            layout,
                            args.batch,
                            args.heads,
                            args.kv_heads,
                            args.headdim,
                            s,
                            args.dtype,
                            world_size,
                        )
                        for s in sorted(args.seqlens)
                    ]
                )
    return series


def check_args(args, world_size: int) -> None:
    parts = 2 * world_size if "zigzag" in args.layouts else world_size
    bad = [s for s in args.seqlens if s % parts]
    if bad:
        raise SystemExit(f"--seqlens must be multiples of {parts} (2 * world_size for the zig-zag layout), got {bad}")
    if "ulysses" in args.providers and args.heads % world_size:
        raise SystemExit(f"ulysses needs --heads ({args.heads}) to be a multiple of the world size ({world_size})")


def format_table(rows: list[dict]) -> str:
    head = ["provider", "mask", "layout", "seqlen", "mode", "ms", "tokens/s", "TFLOP/s/GPU", "peak MiB/GPU"]
    lines = [head]
    for r in rows:
        peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(
            [
                r["provider"],
                r["mask"],
                r["layout"],
                str(r["seqlen"]),
                r["mode"],
                f"{r['ms']:.2f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['tflops_per_gpu']:.1f}",
                peak,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """tokens/s (top) and peak memory per GPU (bottom) against seqlen: a column per (mask, mode), a line
    per provider and layout, and dashed, the ideal N x single-gpu tokens/s."""
    from matplotlib.figure import Figure

    columns = sorted({(r["mask"], r["mode"]) for r in rows})
    lines = sorted({(r["provider"], r["layout"]) for r in rows})
    world_size = rows[0]["world_size"]
    metrics = [("tokens_per_s", "tokens/s (group)")]
    if any(r["peak_mem_mb"] is not None for r in rows):
        metrics.append(("peak_mem_mb", "peak MiB per GPU"))
    fig = Figure(figsize=(4.2 * len(columns), 3.2 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), len(columns), squeeze=False)
    for j, (mask, mode) in enumerate(columns):
        for i, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            for n, (provider, layout) in enumerate(lines):
                points = sorted(
                    (r["seqlen"], r[key])
                    for r in rows
                    if (r["mask"], r["mode"], r["provider"], r["layout"]) == (mask, mode, provider, layout)
                )
                if points:
                    name = provider if layout == "-" else f"{provider} ({layout})"
                    ax.plot(*zip(*points, strict=True), marker="o", label=name, color=f"C{n}")
                if points and provider == "single-gpu" and key == "tokens_per_s":
                    ideal = [(s, world_size * y) for s, y in points]
                    ax.plot(*zip(*ideal, strict=True), ls="--", label=f"ideal: {world_size} x single-gpu", color="gray")
            seqlens = sorted({r["seqlen"] for r in rows})
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens, [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.set_title(f"{mask}, {mode}", fontsize=10)
            ax.set_xlabel("seqlen (whole sequence)")
            ax.set_ylabel(label)
    legend = {}  # label -> handle, over every panel (a line may be missing from some)
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=len(legend))
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_seqlen(text: str) -> int:
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument(
        "--seqlens",
        nargs="+",
        type=parse_seqlen,
        default=list(DEFAULT_SEQLENS),
        metavar="S",
        help="whole-sequence lengths, e.g. 16k 32k (default: 16k to 256k)",
    )
    p.add_argument("--masks", nargs="+", choices=("causal", "full"), default=["causal", "full"])
    p.add_argument(
        "--layouts",
        nargs="+",
        choices=("zigzag", "contiguous"),
        default=["zigzag"],
        help="how the sequence is sharded (zigzag: load_balance=True); contiguous is unbalanced under a causal mask",
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo, a smoke test")
    p.add_argument("--timeout", type=int, default=600, help="process group timeout, seconds")
    p.add_argument("--json", type=Path, metavar="PATH")
    p.add_argument("--plot", type=Path, metavar="PATH")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(
        backend, timeout=timedelta(seconds=args.timeout), device_id=device if backend == "nccl" else None
    )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    check_args(args, world_size)
    command = shlex.join(["torchrun", f"--nproc-per-node={world_size}", "benchmarks/context_parallel.py", *argv])
    meta = {**run_meta(command, device), "world_size": world_size, "backend": backend}
    rows, skips = [], []

    def save():
        if rank == 0 and args.json:
            write_json(args.json, meta, rows, skips=skips)

    for series in configs(args, world_size):
        for c in series:
            failed = None
            for mode in args.modes:
                try:
                    ms, peak = measure(c, mode, args, device)
                    ok = 1.0
                except Exception as error:  # out of memory: agreed on below, so every rank skips together
                    failed, ok = f"{type(error).__name__}: {str(error).splitlines()[0][:150]}", 0.0
                    ms, peak = 0.0, 0.0
                if group_max(1.0 - ok, device) > 0:
                    skips.append({**dataclasses.asdict(c), "mode": mode, "error": failed or "failed on another rank"})
                    failed = failed or "another rank"
                    break
                rows.append(
                    make_row(
                        c, mode, group_max(ms, device), group_max(peak or 0.0, device) if peak is not None else None
                    )
                )
                if rank == 0:
                    r = rows[-1]
                    print(
                        f"{c.provider} {c.mask} {c.layout} seqlen {c.seqlen} {mode}: {r['ms']:.2f} ms, "
                        f"{r['tokens_per_s']:.0f} tokens/s",
                        flush=True,
                    )
                save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if failed:
                save()
                break  # longer sequences of this provider would fail too
    if rank == 0:
        print(format_table(rows))
        for s in skips:
            print(f"skip: {s['provider']} {s['mask']} {s['layout']} seqlen {s['seqlen']} {s['mode']}: {s['error']}")
        if args.plot and rows:
            title = f"{meta['device']} x {world_size}, {args.dtype}, torch {meta['torch']}, {meta['date']}"
            plot(rows, args.plot, title)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
