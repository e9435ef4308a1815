"""The Triton kernels compile for sm_80, sm_90 and sm_100 targets on the CPU (``triton_targets.py``, in its own
process, with the arguments their launchers pass): every kernel, with one tanh.approx per score, tensor-core
products and, from sm_90 on, TMA loads where the launcher passes descriptors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton_targets

SCRIPT = Path(__file__).with_name("triton_targets.py")
KERNELS = {
    "sigmoid_attn_fwd_kernel",
    "sigmoid_attn_sum_splits_kernel",
    "sigmoid_attn_bwd_kernel_dkdv",
    "sigmoid_attn_bwd_kernel_dq",
}
# What does not build, per target, as (case, kernel): problem. With a head dim above 128 on sm_100, Triton
# 3.6-3.9 compile the dK/dV kernel to a single trap (its two [64, 256] fp32 accumulators and two score tiles
# need more than the 512 columns of tensor memory), so the dispatcher keeps such backward calls off the Triton
# kernels there (backends.TritonBackend). If a Triton release builds it, this test fails: then lift that rule.
KNOWN = {100: {("dense-D256-fp16-causal-G4", "sigmoid_attn_bwd_kernel_dkdv"): ["compiled to a trap"]}}


@pytest.fixture(scope="module")
def compiled() -> dict[int, tuple[int, list[dict], str]]:
    """(exit status, records, end of stderr) of ``triton_targets.py`` per target, the three run at once."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {
        capability: subprocess.Popen(
            [sys.executable, str(SCRIPT), str(capability)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=SCRIPT.parent.parent,
        )
        for capability in (80, 90, 100)
    }
    results = {}
    for capability, run in runs.items():
        stdout, stderr = run.communicate(timeout=900)
        records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        results[capability] = (run.returncode, records, stderr[-3000:])
    return results


@pytest.mark.parametrize("capability", [80, 90, 100], ids=["sm_80", "sm_90", "sm_100"])
def test_triton_kernels_compile_for_target(compiled, capability):
    returncode, records, stderr = compiled[capability]
    errors = [r for r in records if "error" in r]
    assert not errors, errors
    assert {r["case"] for r in records} == set(triton_targets.CASES), stderr
    assert {r["kernel"] for r in records} == KERNELS
    assert {r["target"] for r in records} == {f"sm_{capability}"}
    problems = {(r["case"], r["kernel"]): r["problems"] for r in records if r["problems"]}
    assert problems == KNOWN.get(capability, {})
    assert returncode == (1 if problems else 0), stderr
    # TMA descriptors from sm_90 on: the dense rows of 1024 keys take them, the rest do not.
    tma = {r["case"] for r in records if r.get("TMA")}
    assert tma == ({"dense-D64-bf16-causal-tma", "dense-D128-fp16-headbias-tma"} if capability >= 90 else set())


@pytest.mark.parametrize("capability", [(9, 0), (10, 0), (12, 0)])
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "grad"])
def test_dispatch_keeps_wide_heads_with_gradients_off_blackwell_kernels(monkeypatch, capability, head_dim, grad):
    """The rule that goes with KNOWN: only a call whose backward would build the trapping dK/dV kernel (head dim
    above 128, gradients, compute capability 10.0 or newer) leaves the Triton kernels, with its reason."""
    from types import SimpleNamespace

    import torch

    from sigattn import backends
    from sigattn.ops.sigmoid_attn.reference import Mask

    monkeypatch.setattr(backends, "_capability", lambda index: capability)
    monkeypatch.setattr(backends, "_import_error", [None])
    q = SimpleNamespace(
        device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(1, 128, 4, head_dim), requires_grad=grad
    )
    call = backends.AttnCall("dense", q, q, q, 0.125, None, Mask(causal=True), None, False)
    declines = head_dim > 128 and grad and capability >= (10, 0)
    reason = f"head dim {head_dim} with gradients on compute capability 10.0 or newer"
    assert backends.BACKENDS["triton"].not_supported_reasons(call) == ([reason] if declines else [])
