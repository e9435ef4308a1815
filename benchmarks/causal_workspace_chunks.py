"""Device script: the causal backward's workspace chunks, as dispatched (hopper_bwd._chunks) against chunks of
32 MiB (then heaviest key tiles first), in the public fwd, bwd and fwd+bwd against cuDNN.
python benchmarks/causal_workspace_chunks.py OUT.json"""

# ruff: noqa: B023 (each timed closure runs within the loop iteration that made it)

import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import sigattn
from sigattn.check import versions
from sigattn.ops.sigmoid_attn import hopper_bwd


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
    B, H = 16384 // S, 2048 // D
    flops = 4 * B * H * S * S * D / 2
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    dot = do.transpose(1, 2)

    def ours_fwd():
        return sigattn.sigmoid_attn_func(q, k, v, causal=True)

    o = ours_fwd()

    def ours_bwd():
        o.backward(do, retain_graph=True)

    def ours_fb():
        ours_fwd().backward(do)

    def cud_fwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    oc = cud_fwd()

    def cud_bwd():
        oc.backward(dot, retain_graph=True)

    def cud_fb():
        cud_fwd().backward(dot)

    row = dict(D=D, S=S, chunks_now=hopper_bwd._chunks(B, H, S * D * 4, S))
    for _ in range(2):  # interleaved twice
        for name, fn, mult, pol in (
            ("cudnn fwd", cud_fwd, 1, None),
            ("cudnn bwd", cud_bwd, 2.5, None),
            ("cudnn fwd+bwd", cud_fb, 3.5, None),
            ("ours fwd", ours_fwd, 1, None),
            ("ours bwd", ours_bwd, 2.5, 8192),
            ("ours bwd chunks32", ours_bwd, 2.5, 1),
            ("ours fwd+bwd", ours_fb, 3.5, 8192),
            ("ours fwd+bwd chunks32", ours_fb, 3.5, 1),
        ):
            with workspace_keys(pol if pol is not None else hopper_bwd.WORKSPACE_KEYS):
                ms = do_bench(fn, warmup=200, rep=500, grad_to_none=[q, k, v, qt, kt, vt], return_mode="median")
            row.setdefault(name, []).append(round(mult * flops / ms / 1e9, 1))
    print(json.dumps(row), flush=True)
    rows.append(row)
with open(sys.argv[1], "w") as f:
    json.dump({"meta": versions(" ".join(["python"] + sys.argv)), "rows": rows}, f, indent=1)
