"""The CPU path's memory grows with S * D, not S^2: causal attention over 32768 tokens, forward and
backward, in a fresh process whose peak resident memory we can read.

One (S, S) float32 score matrix would be 4 GiB; the whole run must stay below 1 GiB of growth.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

GIB = 1 << 30
SEQLEN, HEAD_DIM = 32768, 64

SCRIPT = textwrap.dedent(
    """
    import json, math, resource, sys, time
    import torch
    from sigattn import sigmoid_attn_func, use_backend
    from sigattn.ops.sigmoid_attn.reference import sigmoid_attn_reference

    S, D = int(sys.argv[1]), int(sys.argv[2])
    bias = -math.log(S)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, S, 1, D, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, S, 1, D)
    with use_backend("torch"):  # warm up: lazily loaded kernels and libraries count in the baseline
        small = [t.detach()[:, :256].clone().requires_grad_() for t in (q, k, v)]
        sigmoid_attn_func(*small, causal=True, bias=bias).backward(dout[:, :256])
    kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    baseline = kib()
    start = time.perf_counter()
    with use_backend("torch"):
        out = sigmoid_attn_func(q, k, v, causal=True, bias=bias)
        out.backward(dout)
    seconds = time.perf_counter() - start
    peak = kib()
    # Causal rows only see earlier keys: the first 512 rows are attention over the first 512 tokens.
    n = 512
    ref = sigmoid_attn_reference(*(t.detach()[:, :n] for t in (q, k, v)), causal=True, bias=bias)
    print(json.dumps(dict(
        growth_bytes=(peak - baseline) * 1024,
        seconds=seconds,
        out_finite=bool(torch.isfinite(out).all()),
        grads_finite=all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v)),
        out_dtype=str(out.dtype),
        shapes=[list(t.shape) for t in (out, q.grad, k.grad, v.grad)],
        prefix_error=(out[:, :n].double() - ref).abs().max().item(),
    )))
    """
)


def test_causal_32k_forward_backward_stays_far_below_s_squared():
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(SEQLEN), str(HEAD_DIM)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    growth_mib = result["growth_bytes"] / 2**20
    print(f"S={SEQLEN} causal fwd+bwd: {result['seconds']:.1f} s, peak RSS growth {growth_mib:.0f} MiB")
    shape = [1, SEQLEN, 1, HEAD_DIM]
    assert result["shapes"] == [shape] * 4
    assert result["out_dtype"] == "torch.float32"
    assert result["out_finite"] and result["grads_finite"]
    assert result["prefix_error"] < 1e-5
    assert result["growth_bytes"] < 1 * GIB, f"peak RSS grew by {result['growth_bytes'] / GIB:.2f} GiB"
