"""Device script: GPU time of the Gluon and Triton backwards at short sequences, from CUDA-graph replays
(kernels only, no host time), to place the dispatch threshold between them.
python benchmarks/backward_short_sequences.py OUT.json"""

# ruff: noqa: B023 (each timed closure runs within the loop iteration that made it)

import itertools
import json
import sys
from pathlib import Path

import torch
from host_overhead import graph_us  # benchmarks/ is on the path of a script run from it

from sigattn.ops.sigmoid_attn import kernels
from sigattn.ops.sigmoid_attn.params import Params
from sigattn.ops.sigmoid_attn.reference import Mask, resolve_bias
from sigattn.runinfo import run_meta, write_json


def main() -> list[dict]:
    rows = []
    shapes = [(64, 256, 6, 64)]  # shakespeare-char's
    shapes += [(16384 // s, s, 2048 // d, d) for s, d in itertools.product((128, 256, 512, 1024, 2048), (64, 128))]
    for (batch, seqlen, heads, head_dim), causal in itertools.product(shapes, (True, False)):
        q, k, v, do = (
            torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4)
        )
        bias, mask = resolve_bias(None, seqlen), Mask(causal=causal)
        fast, det = Params(head_dim**-0.5, mask), Params(head_dim**-0.5, mask, deterministic=True)
        grads = tuple(torch.empty_like(t) for t in (q, k, v))
        row = dict(batch=batch, seqlen=seqlen, heads=heads, head_dim=head_dim, causal=causal)
        row["gluon_us"] = graph_us(lambda p=fast: kernels.backward(do, q, k, v, p, bias, grads=grads))
        row["triton_us"] = graph_us(lambda p=det: kernels.backward(do, q, k, v, p, bias, grads=grads))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    write_json(Path(sys.argv[1]), run_meta(" ".join(["python", *sys.argv])), main())
