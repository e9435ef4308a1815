"""Timing shared by the decode scripts (decode_splits.py, decode_floors.py, decode_large_batch.py): one
CUDA-graph replay per measurement with the L2 flushed before it, as ``sigattn bench --decode`` times decode."""

import json
import statistics
import sys
from functools import cache

import torch
import triton

from sigattn.runinfo import run_meta


@cache
def _flush_buffers() -> tuple[torch.Tensor, torch.Tensor]:
    """One to write (leaves dirty lines in L2, as the bench's flush does), one to read (leaves clean ones)."""
    return (
        torch.empty(256 * 2**20, dtype=torch.int8, device="cuda"),
        torch.ones(64 * 2**20, dtype=torch.float32, device="cuda"),
    )


def bench_graph(fn, n: int = 200, clean: bool = False) -> float:
    """Median microseconds of one replay of fn captured in a CUDA graph, the L2 flushed before each."""
    dirty_flush, clean_flush = _flush_buffers()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and allocate outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        if clean:
            clean_flush.sum()
        else:
            dirty_flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) * 1e3


def bench_copy(nbytes: int, clean: bool = False) -> float:
    """A device copy reading and writing nbytes in all (a function, so its buffers are freed on return)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return bench_graph(lambda: dst.copy_(src), clean=clean)


def write_result(path: str, rows: list) -> None:
    meta = run_meta(" ".join(["python", *sys.argv]))
    meta["triton"] = triton.__version__
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
