"""Device script: the causal backward's workspace chunks, as dispatched (hopper_bwd._chunks) against chunks of
32 MiB (then heaviest key tiles first), in the public fwd, bwd and fwd+bwd against cuDNN.
python benchmarks/causal_workspace_chunks.py OUT.json"""

import json
import sys
from pathlib import Path

from triton.testing import do_bench

from sigattn.bench import sweep
from sigattn.ops.sigmoid_attn import hopper_bwd
from sigattn.runinfo import run_meta, write_json


class workspace_keys:  # hopper_bwd.WORKSPACE_KEYS within a with block
    def __init__(self, keys):
        self.keys = keys

    def __enter__(self):
        self.saved = hopper_bwd.WORKSPACE_KEYS
        hopper_bwd.WORKSPACE_KEYS = self.keys

    def __exit__(self, *a):
        hopper_bwd.WORKSPACE_KEYS = self.saved


rows = []
for D, S in ((128, 2048), (128, 4096), (128, 8192), (64, 4096), (64, 8192)):
    (shape,) = sweep.sweep_shapes([D], [S], [True], "bf16")
    B, H = shape.batch, shape.heads
    calls = {}
    for provider in ("sdpa-cudnn", "sigattn"):
        inputs = sweep.make_inputs(sweep.PROVIDERS[provider].layout, shape)
        attn = sweep.PROVIDERS[provider].build(shape)
        for mode in sweep.MODES:
            calls[provider, mode] = sweep.timed_call(attn, inputs, mode), inputs

    row = dict(D=D, S=S, chunks_now=hopper_bwd._chunks(B, H, S * D * 4, S))
    for _ in range(2):  # interleaved twice
        for name, (provider, mode), keys in (
            ("cudnn fwd", ("sdpa-cudnn", "fwd"), None),
            ("cudnn bwd", ("sdpa-cudnn", "bwd"), None),
            ("cudnn fwd+bwd", ("sdpa-cudnn", "fwd+bwd"), None),
            ("ours fwd", ("sigattn", "fwd"), None),
            ("ours bwd", ("sigattn", "bwd"), 8192),
            ("ours bwd chunks32", ("sigattn", "bwd"), 1),
            ("ours fwd+bwd", ("sigattn", "fwd+bwd"), 8192),
            ("ours fwd+bwd chunks32", ("sigattn", "fwd+bwd"), 1),
        ):
            fn, inputs = calls[provider, mode]
            with workspace_keys(keys if keys is not None else hopper_bwd.WORKSPACE_KEYS):
                ms = do_bench(fn, warmup=200, rep=500, grad_to_none=inputs, return_mode="median")
            row.setdefault(name, []).append(round(sweep.attention_flops(shape, mode) / ms / 1e9, 1))
    print(json.dumps(row), flush=True)
    rows.append(row)
write_json(Path(sys.argv[1]), run_meta(" ".join(["python", *sys.argv])), rows)
