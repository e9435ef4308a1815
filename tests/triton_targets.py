"""Compiles the Triton kernels (``triton_kernels.py``) for a GPU target on a machine without a GPU.

``python tests/triton_targets.py 80`` (or 90, 100) runs the launchers on CPU tensors for every call kind
in ``CASES`` while Triton's active driver reports an sm_80 (sm_90, sm_100) GPU, so every kernel the
launchers would start is compiled (``JITFunction.warmup``: through ptxas to a cubin, nothing launched)
with exactly the arguments, specialisations and options the launchers pass. It prints one JSON line per
compiled kernel and exits non-zero if a kernel fails to compile or lacks what its PTX must hold.

It runs in its own process: the kernels must be imported without ``TRITON_INTERPRET=1`` (which the test
suite sets, ``conftest.py``), since under the interpreter they use the exact sigmoid and fp32 products
instead of ``tanh.approx`` and the tensor cores. ``tests/test_triton_targets.py`` runs it for each target,
and ``tests/test_triton_matrix.py`` does so under every supported Triton release.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from sigattn.ops.sigmoid_attn.dropout import Dropout
from sigattn.ops.sigmoid_attn.params import Params, Rows
from sigattn.ops.sigmoid_attn.reference import Mask


class TargetDriver:
    """Triton's active driver for compiling only: it reports one GPU of the given target and has no device."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return self.target.arch  # the JIT keeps one binder and cache per device: one per target here

    def get_current_stream(self, device=None):
        return 0


class Compiling:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` compiles it and records the result."""

    def __init__(self, kernel, compiled: list):
        self.kernel, self.compiled = kernel, compiled

    def __getitem__(self, grid):
        def compile_only(*args, **kwargs):
            self.compiled.append((self.kernel.__name__, kwargs, self.kernel.warmup(*args, grid=grid, **kwargs)))

        return compile_only


def _qkv(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, packed=False, head_dim_v=None):
    shape_q = (batch * seqlen_q, heads, head_dim) if packed else (batch, seqlen_q, heads, head_dim)
    shape_k = (batch * seqlen_k, kv_heads) if packed else (batch, seqlen_k, kv_heads)
    k, v = torch.randn(*shape_k, head_dim, dtype=dtype), torch.randn(*shape_k, head_dim_v or head_dim, dtype=dtype)
    return torch.randn(shape_q, dtype=dtype), k, v


def _dense(kernels, dtype, head_dim, causal, seqlen_k, bias=-2.0, heads=(4, 2), dropout=None, head_dim_v=None):
    """Forward and backward of dense rows (TMA K/V descriptors on sm_90+ from triton_host.TMA_MIN_KEYS keys)."""
    q, k, v = _qkv(1, 128, seqlen_k, *heads, head_dim, dtype, head_dim_v=head_dim_v)
    params = Params(0.1, Mask(causal), dropout=dropout)
    out = kernels.forward(q, k, v, params, bias)
    kernels.backward(torch.randn_like(out), q, k, v, params, bias)


def _varlen(kernels, dtype, head_dim, causal, window=(-1, -1), alibi=None):
    q, k, v = _qkv(2, 64, 96, 4, 2, head_dim, dtype, packed=True)
    cu_q, cu_k = torch.tensor([0, 50, 128], dtype=torch.int32), torch.tensor([0, 100, 192], dtype=torch.int32)
    params, rows = Params(0.1, Mask(causal, window)), Rows.packed(cu_q, cu_k, 78, 100)
    out = kernels.forward(q, k, v, params, None, alibi, rows)
    kernels.backward(torch.randn_like(out), q, k, v, params, None, alibi, rows)


def _kvcache(kernels, dtype, head_dim, paged, splits, head_dim_v=None):
    q = torch.randn(2, 1, 8, head_dim, dtype=dtype)
    slots = (8, 64, 2) if paged else (2, 256, 2)
    k, v = torch.randn(*slots, head_dim, dtype=dtype), torch.randn(*slots, head_dim_v or head_dim, dtype=dtype)
    block_table = torch.arange(8, dtype=torch.int32).view(2, 4) if paged else None
    seqlens = torch.tensor([100, 256], dtype=torch.int32)
    params = Params(0.1, Mask(causal=True))
    kernels.decode(q, k, v, params, None, None, seqlens, block_table, num_splits=splits)


# Every kernel, in the specialisations that change its code most: each tile table's head dims (64, 128, 256,
# and 96 padded to 128), causal and sliding-window masks, a per-head bias tensor (its gradient partials),
# ALiBi, GQA, TMA descriptors (dense rows of 1024+ keys), attention dropout (Philox in the kernels), packed
# sequences, the KV cache (contiguous and paged, with GQA packing and split keys, whose partial sums take
# the sum kernel), and a value head dim of its own (DeepSeek's 192/128: its dK/dV kernel, with a [64, 128] dV
# accumulator, compiles for sm_100 without D256's trap). Compiling them all for one target takes 25-40 s on a
# 2-core CPU.
CASES = {
    "dense-D64-bf16-causal-tma": lambda f: _dense(f, torch.bfloat16, 64, True, 1024),
    "dense-D128-fp16-headbias-tma": lambda f: _dense(f, torch.float16, 128, False, 1024, bias=torch.zeros(4)),
    "dense-D256-fp16-causal-G4": lambda f: _dense(f, torch.float16, 256, True, 200, heads=(8, 2)),
    "dense-D64-bf16-causal-dropout": lambda f: _dense(
        f, torch.bfloat16, 64, True, 300, dropout=Dropout(0.1, torch.tensor([7]))
    ),
    "varlen-D96-bf16-window-alibi": lambda f: _varlen(
        f, torch.bfloat16, 96, False, window=(32, 8), alibi=torch.full((4,), 0.1)
    ),
    "kvcache-D128-bf16-split": lambda f: _kvcache(f, torch.bfloat16, 128, paged=False, splits=4),
    "kvcache-D64-fp16-paged": lambda f: _kvcache(f, torch.float16, 64, paged=True, splits=1),
    "dense-D192-Dv128-bf16-causal": lambda f: _dense(f, torch.bfloat16, 192, True, 300, head_dim_v=128),
    "kvcache-D192-Dv128-bf16-paged-split": lambda f: _kvcache(
        f, torch.bfloat16, 192, paged=True, splits=2, head_dim_v=128
    ),
}


def check(name: str, options: dict, ptx: str, capability: int) -> list[str]:
    """What a kernel's PTX must hold: the attention kernels one tanh.approx per score (no exact sigmoid),
    their products on the tensor cores, and TMA loads where the launcher passed descriptors."""
    problems = []
    if name == "sigmoid_attn_sum_splits_kernel":
        return problems
    if "tanh.approx.f32" not in ptx:
        problems.append("compiled to a trap" if "\ttrap;" in ptx else "no tanh.approx.f32")
    mma = {80: "mma.sync", 90: "wgmma", 100: "tcgen05.mma"}[capability]
    if options.get("BLOCK_M", 16) >= 64 and mma not in ptx and "mma.sync" not in ptx:
        problems.append(f"no tensor-core product ({mma})")
    if options.get("TMA") and "cp.async.bulk.tensor" not in ptx:
        problems.append("TMA descriptors passed, no cp.async.bulk.tensor")
    return problems


def main(capability: int) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the kernels must be imported as they are on a GPU")
    from sigattn.ops.sigmoid_attn import kernels, triton_host

    driver.set_active(TargetDriver(capability))
    triton_host._has_tma.cache_clear()
    triton_host._has_tma = lambda device: capability >= 90  # what the launcher asks the GPU
    compiled: list = []
    for name in (
        "sigmoid_attn_fwd_kernel",
        "sigmoid_attn_sum_splits_kernel",
        "sigmoid_attn_bwd_kernel_dkdv",
        "sigmoid_attn_bwd_kernel_dq",
    ):
        setattr(triton_host, name, Compiling(getattr(triton_host, name), compiled))
    failures = 0
    for case, run in CASES.items():
        start = len(compiled)
        try:
            run(kernels)
        except Exception as error:  # a compile error: report it with the case, then go on
            print(json.dumps({"case": case, "error": f"{type(error).__name__}: {str(error)[-2000:]}"}))
            failures += 1
            continue
        for name, options, kernel in compiled[start:]:
            problems = check(name, options, kernel.asm["ptx"], capability)
            failures += bool(problems)
            flags = {k: v for k, v in options.items() if k in ("BLOCK_M", "BLOCK_N", "HEAD_DIM", "TMA", "NUM_SPLITS")}
            print(
                json.dumps(
                    {
                        "case": case,
                        "kernel": name,
                        "target": f"sm_{capability}",
                        "triton": triton.__version__,
                        "cubin_bytes": len(kernel.asm["cubin"]),
                        "problems": problems,
                        **flags,
                    }
                )
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
