"""``sigattn bench --decode`` and ``sigattn bench --varlen``: the inference kernels against baselines measured
in the same run, on CUDA, timed with ``triton.testing.do_bench`` (median, L2 flushed between calls).

Decode: one new query per sequence against a KV cache of ``cache_len`` tokens, bf16, D = 128, Hq/Hkv = 32/8
and 32/32, batch 1 ... 64, cache 1k ... 128k. Providers:

    sigattn        sigmoid_attn_with_kvcache on a contiguous cache (cache_seqlens=None: the whole cache)
    sigattn-paged  the same cache in pages of PAGE_SIZE tokens, in shuffled order, through block_table
    sdpa-<kernel>  softmax torch.nn.functional.scaled_dot_product_attention, (B, H, 1, D) queries against
                   (B, Hkv, cache_len, D) keys and values (enable_gqa for Hq != Hkv), on each SDPA backend
    copy           a device-to-device copy that moves as many bytes as the attention reads (half read, half
                   written), timed the same way: what streaming those bytes once costs, launch included.
                   At small caches it falls well short of ``meta.copy_gbps`` (1 GiB): the fixed cost of a
                   replay (launch, the flushed cache's write-back, ramp-up) is a large part of the time

Each step is timed twice. ``ms`` replays it from a CUDA graph (as a serving loop does; the L2 cache is
flushed before every replay): the GPU's time, which the targets are about. ``ms_eager`` calls it from
Python (``do_bench``): at short caches that is the host's time per call (argument checks, dispatch, kernel
launches), not the GPU's. ``gbps`` (and ``gbps_eager``) is the bytes of K and V read
(2 * B * cache_len * Hkv * D * 2) per second, in GB/s (1e9); ``meta.copy_gbps`` is a 1 GiB
device-to-device copy measured in the same run, counting the bytes read and the bytes written. A shape whose
K and V exceed ``MAX_CACHE_GIB`` is not run (the table says so).

Varlen: 16384 tokens of packed sequences, H = 16, D = 128, causal, bf16, forward and forward + backward;
providers ``sigattn-varlen`` (sigmoid_attn_varlen_func), ``sigattn-dense`` (sigmoid_attn_func on the same
tokens as a batch of equal sequences; only for equal lengths) and ``sigattn-loop`` (sigmoid_attn_func on
each sequence in turn). ``lengths`` is "equal" (seqlen each) or "mixed" (random lengths with mean seqlen,
the same for every provider). TFLOP/s count the unmasked pairs of every sequence, backward 2.5x forward.
Timed both ways too: ``ms`` and ``tflops`` from CUDA-graph replays (the kernels' throughput, which the
comparison is about: at 512-1k tokens per sequence a call's GPU work is shorter than the host's time to
issue it), ``ms_eager`` and ``tflops_eager`` from Python.

JSON: ``{"meta": {..., "copy_gbps"}, "rows": [...]}``; decode rows ``{"provider", "mode": "decode", "batch",
"cache_len", "heads", "kv_heads", "headdim", "dtype", "ms", "gbps", "ms_eager", "gbps_eager"}``, varlen
rows ``{"provider", "mode", "lengths", "total_tokens", "seqlen", "batch", "heads", "headdim", "causal",
"dtype", "ms", "tflops", "ms_eager", "tflops_eager"}`` (``ms`` and ``tflops`` None, with the reason among the
skips, if a step could not be captured in a graph).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .. import sigmoid_attn_func, sigmoid_attn_varlen_func, sigmoid_attn_with_kvcache
from ..plotting import figure, save_figure
from ..runinfo import run_meta, write_json
from .sweep import describe_error

DECODE_BATCHES = (1, 4, 16, 64)
DECODE_CACHE_LENS = (1024, 4096, 8192, 16384, 32768, 65536, 131072)
DECODE_HEADS = ((32, 8), (32, 32))
DECODE_HEADDIM = 128
QUICK_DECODE = dict(batches=(1, 16), cache_lens=(4096, 32768), heads=((32, 8),))
PAGE_SIZE = 16
MAX_CACHE_GIB = 16
SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")
VARLEN_TOKENS, VARLEN_HEADS, VARLEN_HEADDIM = 16384, 16, 128
VARLEN_SEQLENS, QUICK_VARLEN_SEQLENS = (512, 1024, 2048, 4096), (1024,)
VARLEN_MODES = ("fwd", "fwd+bwd")
DTYPE = torch.bfloat16


def _bench(fn: Callable[[], object], quick: bool) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")


def _bench_graph(fn: Callable[[], object], quick: bool) -> float:
    """Median ms of replaying ``fn`` from a CUDA graph, with the L2 cache flushed before each replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile, allocate) outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(50 if quick else 200)
    ]
    for start, end in events:
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_gbps(quick: bool) -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy, in GB/s."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), quick)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------ decode


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    batch: int
    cache_len: int
    heads: int
    kv_heads: int
    headdim: int = DECODE_HEADDIM

    @property
    def kv_bytes(self) -> int:
        return 2 * self.batch * self.cache_len * self.kv_heads * self.headdim * DTYPE.itemsize


def decode_shapes(quick: bool) -> list[DecodeShape]:
    grid = QUICK_DECODE if quick else dict(batches=DECODE_BATCHES, cache_lens=DECODE_CACHE_LENS, heads=DECODE_HEADS)
    return [
        DecodeShape(b, n, hq, hkv)
        for (hq, hkv), b, n in itertools.product(grid["heads"], grid["batches"], grid["cache_lens"])
    ]


def _decode_sigattn(shape: DecodeShape, paged: bool) -> Callable[[], Tensor]:
    b, n, hq, hkv, d = shape.batch, shape.cache_len, shape.heads, shape.kv_heads, shape.headdim
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=DTYPE)
    block_table = None
    if paged:
        pages = b * n // PAGE_SIZE
        k_cache, v_cache = (torch.randn(pages, PAGE_SIZE, hkv, d, device="cuda", dtype=DTYPE) for _ in "kv")
        block_table = torch.randperm(pages, device="cuda").reshape(b, -1).to(torch.int32)
    else:
        k_cache, v_cache = (torch.randn(b, n, hkv, d, device="cuda", dtype=DTYPE) for _ in "kv")
    bias = -math.log(n)
    return lambda: sigmoid_attn_with_kvcache(q, k_cache, v_cache, block_table=block_table, bias=bias)


def _decode_copy(shape: DecodeShape) -> Callable[[], Tensor]:
    src = torch.empty(shape.kv_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _decode_sdpa(shape: DecodeShape, kernel: str) -> Callable[[], Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    backend = getattr(SDPBackend, names[kernel])
    b, n, hq, hkv, d = shape.batch, shape.cache_len, shape.heads, shape.kv_heads, shape.headdim
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=DTYPE) for _ in "kv")
    gqa = hq != hkv

    def step():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    return step


DECODE_PROVIDERS: dict[str, Callable[[DecodeShape], Callable[[], Tensor]]] = {
    "sigattn": lambda s: _decode_sigattn(s, paged=False),
    "sigattn-paged": lambda s: _decode_sigattn(s, paged=True),
    **{f"sdpa-{k}": (lambda s, k=k: _decode_sdpa(s, k)) for k in SDPA_KERNELS},
    "copy": _decode_copy,
}


def run_decode(quick: bool, progress=print) -> tuple[list[dict], list[tuple[str, DecodeShape, str]]]:
    rows, skips = [], []
    for shape in decode_shapes(quick):
        if shape.kv_bytes > MAX_CACHE_GIB * 2**30:
            skips += [(p, shape, f"K and V exceed {MAX_CACHE_GIB} GiB") for p in DECODE_PROVIDERS]
            continue
        for name, build in DECODE_PROVIDERS.items():
            try:
                step = build(shape)
                step()
                ms_eager = _bench(step, quick)
                ms = _bench_graph(step, quick)
            except Exception as error:  # an unsupported shape or out of memory: record it, go on
                skips.append((name, shape, describe_error(error)))
                continue
            finally:
                torch.cuda.empty_cache()
            rows.append(
                {
                    "provider": name,
                    "mode": "decode",
                    **dataclasses.asdict(shape),
                    "dtype": "bf16",
                    "ms": round(ms, 5),
                    "gbps": round(shape.kv_bytes / (ms * 1e-3) / 1e9, 1),
                    "ms_eager": round(ms_eager, 5),
                    "gbps_eager": round(shape.kv_bytes / (ms_eager * 1e-3) / 1e9, 1),
                }
            )
        progress(f"decode B={shape.batch} cache={shape.cache_len} {shape.heads}/{shape.kv_heads}: done")
    return rows, skips


def format_decode(rows: list[dict], skips: list, copy: float) -> str:
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    others = [p for p in providers if p.startswith("sdpa")]
    header = [
        "Hq/Hkv",
        "batch",
        "cache",
        *[f"{p} GB/s" for p in providers],
        "sigattn/copy",
        "sigattn/copy of its bytes",
        *[f"vs {p}" for p in others],
        "sigattn eager GB/s",
        "sdpa-flash eager GB/s",
    ]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    keys = sorted({(r["heads"], r["kv_heads"], r["batch"], r["cache_len"]) for r in rows})
    for key in keys:
        cell = {r["provider"]: r for r in rows if (r["heads"], r["kv_heads"], r["batch"], r["cache_len"]) == key}
        ours = cell.get("sigattn")
        line = [f"{key[0]}/{key[1]}", str(key[2]), f"{key[3] // 1024}k"]
        line += [f"{cell[p]['gbps']:.0f}" if p in cell else "skip" for p in providers]
        line.append(f"{ours['gbps'] / copy:.2f}" if ours else "-")
        line.append(f"{ours['gbps'] / cell['copy']['gbps']:.2f}" if ours and "copy" in cell else "-")
        line += [f"{cell[p]['ms'] / ours['ms']:.2f}x" if ours and p in cell else "-" for p in others]
        line += [f"{cell[p]['gbps_eager']:.0f}" if p in cell else "-" for p in ("sigattn", "sdpa-flash")]
        lines.append("| " + " | ".join(line) + " |")
    reasons = sorted({(p, why) for p, _, why in skips})
    lines += [f"skipped {p}: {why}" for p, why in reasons]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ varlen


def _lengths(seqlen: int, mixed: bool, seed: int = 0) -> list[int]:
    """Sequence lengths summing to VARLEN_TOKENS: all seqlen, or uniform in [seqlen / 4, 7 seqlen / 4]."""
    if not mixed:
        return [seqlen] * (VARLEN_TOKENS // seqlen)
    rng = random.Random(seed)
    lengths, left = [], VARLEN_TOKENS
    while left > 0:
        n = min(left, rng.randint(seqlen // 4, 7 * seqlen // 4))
        lengths.append(n)
        left -= n
    return lengths


def _varlen_flops(lengths: list[int], mode: str) -> float:
    pairs = sum(n * (n + 1) / 2 for n in lengths)  # causal
    return 4 * VARLEN_HEADS * VARLEN_HEADDIM * pairs * {"fwd": 1.0, "fwd+bwd": 3.5}[mode]


def _varlen_step(provider: str, lengths: list[int], mode: str) -> Callable[[], object]:
    h, d = VARLEN_HEADS, VARLEN_HEADDIM
    q, k, v = (torch.randn(sum(lengths), h, d, device="cuda", dtype=DTYPE, requires_grad=True) for _ in "qkv")
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
    starts = cu.tolist()
    if provider == "sigattn-varlen":
        attn = lambda: sigmoid_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    elif provider == "sigattn-dense":
        if len(set(lengths)) != 1:
            raise ValueError("the dense kernel needs equal lengths")
        batch = (len(lengths), lengths[0], h, d)
        attn = lambda: sigmoid_attn_func(q.view(batch), k.view(batch), v.view(batch), causal=True)
    else:

        def attn():
            return torch.cat(
                [
                    sigmoid_attn_func(*(t[None, a:b] for t in (q, k, v)), causal=True)[0]
                    for a, b in itertools.pairwise(starts)
                ]
            )

    if mode == "fwd":
        return attn
    dout = torch.randn_like(q)

    def fwd_bwd():
        out = attn()
        torch.autograd.backward(out.reshape(dout.shape), dout)
        q.grad = k.grad = v.grad = None

    return fwd_bwd


VARLEN_PROVIDERS = ("sigattn-varlen", "sigattn-dense", "sigattn-loop")


def run_varlen(quick: bool, progress=print) -> tuple[list[dict], list]:
    rows, skips = [], []
    for seqlen, mixed, mode in itertools.product(
        QUICK_VARLEN_SEQLENS if quick else VARLEN_SEQLENS, (False, True), VARLEN_MODES
    ):
        lengths = _lengths(seqlen, mixed)
        for provider in VARLEN_PROVIDERS:
            if provider == "sigattn-dense" and mixed:
                continue
            try:
                step = _varlen_step(provider, lengths, mode)
                step()
                ms_eager = _bench(step, quick)
            except Exception as error:
                skips.append((provider, seqlen, describe_error(error)))
                continue
            try:
                ms = _bench_graph(step, quick)
            except Exception as error:  # the eager time still stands
                skips.append((provider, seqlen, f"graph replay: {describe_error(error)}"))
                ms = None
            flops = _varlen_flops(lengths, mode)
            rows.append(
                {
                    "provider": provider,
                    "mode": mode,
                    "lengths": "mixed" if mixed else "equal",
                    "total_tokens": VARLEN_TOKENS,
                    "seqlen": seqlen,
                    "batch": len(lengths),
                    "heads": VARLEN_HEADS,
                    "headdim": VARLEN_HEADDIM,
                    "causal": True,
                    "dtype": "bf16",
                    "ms": None if ms is None else round(ms, 5),
                    "tflops": None if ms is None else round(flops / (ms * 1e-3) / 1e12, 2),
                    "ms_eager": round(ms_eager, 5),
                    "tflops_eager": round(flops / (ms_eager * 1e-3) / 1e12, 2),
                }
            )
        progress(f"varlen seqlen={seqlen} {'mixed' if mixed else 'equal'} {mode}: done")
    return rows, skips


def format_varlen(rows: list[dict], skips: list) -> str:
    header = [
        "lengths",
        "seqlen",
        "mode",
        *[f"{p} TFLOP/s" for p in VARLEN_PROVIDERS],
        "varlen/dense",
        "varlen/loop",
        "eager: varlen/dense",
        "eager: varlen/loop",
    ]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]

    def ratios(cell: dict) -> list[str]:
        ours = cell.get("sigattn-varlen")
        return [f"{ours / cell[p]:.2f}" if ours and cell.get(p) else "-" for p in ("sigattn-dense", "sigattn-loop")]

    for key in dict.fromkeys((r["lengths"], r["seqlen"], r["mode"]) for r in rows):
        here = [r for r in rows if (r["lengths"], r["seqlen"], r["mode"]) == key]
        graph, eager = ({r["provider"]: r[field] for r in here} for field in ("tflops", "tflops_eager"))
        line = [key[0], str(key[1]), key[2], *[f"{graph[p]:.0f}" if graph.get(p) else "-" for p in VARLEN_PROVIDERS]]
        lines.append("| " + " | ".join(line + ratios(graph) + ratios(eager)) + " |")
    lines += [f"skipped {p} at seqlen {s}: {why}" for p, s, why in skips]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots


def plot_decode(rows: list[dict], copy: float, path: Path, title: str = ""):
    """GB/s against cache length: a panel per (Hq/Hkv, batch), a line per provider, the copy as a line."""
    panels = sorted({(r["heads"], r["kv_heads"], r["batch"]) for r in rows})
    heads = sorted({p[:2] for p in panels})
    batches = sorted({p[2] for p in panels})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig = figure(figsize=(3.6 * len(batches), 3.0 * len(heads)), layout="constrained", extra="bench")
    axes = fig.subplots(len(heads), len(batches), squeeze=False)
    for (i, hh), (j, b) in itertools.product(enumerate(heads), enumerate(batches)):
        ax = axes[i][j]
        for n, p in enumerate(providers):
            pts = sorted(
                (r["cache_len"], r["gbps"])
                for r in rows
                if (r["heads"], r["kv_heads"], r["batch"]) == (*hh, b) and r["provider"] == p
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=p, color=f"C{n}")
        ax.axhline(copy, color="gray", linestyle="--", label="copy of 1 GiB (read + write)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title(f"Hq/Hkv {hh[0]}/{hh[1]}, batch {b}", fontsize=10)
        ax.set_xlabel("cache length")
        ax.set_ylabel("GB/s of K and V")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def run(args, argv: list[str]) -> int:
    """The --decode / --varlen sweep (arguments checked by ``sigattn.bench.command``); ``argv`` is the
    command line after ``sigattn``."""
    meta = run_meta(shlex.join(["sigattn", *argv]))
    meta["copy_gbps"] = round(copy_gbps(args.quick), 1)
    title = f"{meta['device']}, bf16, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}"
    progress = lambda line: print(line, file=sys.stderr, flush=True)
    print(title)
    if args.decode:
        rows, skips = run_decode(args.quick, progress)
        print(
            f"Decode: GB/s of K and V read (median of CUDA-graph replays; eager: of do_bench); copy "
            f"{meta['copy_gbps']:.0f} GB/s (read + write); 'vs P' = P's time / sigattn's"
        )
        print(format_decode(rows, skips, meta["copy_gbps"]))
    else:
        rows, skips = run_varlen(args.quick, progress)
        print(f"Varlen: {VARLEN_TOKENS} tokens, H={VARLEN_HEADS}, D={VARLEN_HEADDIM}, causal; TFLOP/s")
        print(format_varlen(rows, skips))
    if args.json:
        write_json(args.json, meta, rows)
        print(f"wrote {args.json}")
    if args.plot and args.decode:
        plot_decode(rows, meta["copy_gbps"], args.plot, title)
        print(f"wrote {args.plot}")
    return 0
