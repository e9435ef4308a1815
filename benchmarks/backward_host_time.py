"""Device script: host time per backward call (issue time of back-to-back calls) and total per call,
for the Gluon backward with its workspace budget, without a cap, the Triton one and cuDNN.
python benchmarks/backward_host_time.py OUT.json"""

# ruff: noqa: B023 (each timed closure runs within the loop iteration that made it)

import sys
import time
from pathlib import Path

import torch

from sigattn.ops.sigmoid_attn import hopper_bwd, kernels
from sigattn.ops.sigmoid_attn.params import Params
from sigattn.ops.sigmoid_attn.reference import Mask, resolve_bias
from sigattn.runinfo import run_meta, write_json


def per_call(fn, n=40):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return dict(host_us=(t1 - t0) / n * 1e6, total_us=(t2 - t0) / n * 1e6)


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for S, D, causal in ((512, 128, False), (1024, 128, True), (2048, 128, True), (2048, 64, False), (4096, 128, True)):
        B, H = 16384 // S, 2048 // D
        q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        bias = resolve_bias(None, S)
        fast, det = Params(D**-0.5, Mask(causal=causal)), Params(D**-0.5, Mask(causal=causal), deterministic=True)

        def uncapped():
            saved, hopper_bwd.WORKSPACE_BYTES = hopper_bwd.WORKSPACE_BYTES, 1 << 40
            try:
                kernels.backward(do, q, k, v, fast, bias)
            finally:
                hopper_bwd.WORKSPACE_BYTES = saved

        qt, kt, vt, dot = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v, do))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        fns = dict(
            gluon=lambda: kernels.backward(do, q, k, v, fast, bias),
            gluon_uncapped=uncapped,
            triton=lambda: kernels.backward(do, q, k, v, det, bias),
            cudnn=lambda: torch.autograd.grad(o, (qt, kt, vt), dot, retain_graph=True),
        )
        row = dict(S=S, D=D, causal=causal, chunks=hopper_bwd._chunks(B, H, S * D * 4, S))
        for name, fn in fns.items():
            row[name] = per_call(fn)
        print(row, flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    write_json(Path(sys.argv[1]), run_meta(" ".join(["python", *sys.argv])), main())
