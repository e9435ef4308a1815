"""The Gluon forward for sm_90 (hopper.py) on the CPU: it compiles for sm_90a in every specialisation the
dispatch can ask for, fits its registers without spilling, and the dispatch rule takes exactly the calls it
supports. (Gluon does not run in the interpreter; ``python -m sigattn.check`` runs it on a GPU.)"""

import os
import re
import subprocess

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

from sigattn.ops.sigmoid_attn import hopper

KERNEL = hopper.sigmoid_attn_fwd_kernel_sm90


def compile_sm90(dtype: torch.dtype, causal: bool, head_bias: bool, group: int):
    q = torch.empty(2, 256, 4, 128, dtype=dtype)
    rows, block_n = int(hopper.BLOCK_M) // 2, int(hopper.BLOCK_N)
    args = dict(
        q_desc=hopper.descriptor(q, rows), k_desc=hopper.descriptor(q, block_n),
        v_desc=hopper.descriptor(q, block_n), o_desc=hopper.descriptor(q, rows),
    )  # fmt: skip
    signature = {name: mangle_type(d) for name, d in args.items()}
    signature["head_bias_ptr"] = "*fp32" if head_bias else "constexpr"
    signature.update(seqlen_q="i32", seqlen_k="i32", diag_offset="i32", half_scale="fp32", half_scale_bias="fp32")
    constants = dict(GROUP=group, CAUSAL=causal, HEAD_BIAS=head_bias)
    if not head_bias:
        constants["head_bias_ptr"] = None
    signature.update({name: "constexpr" for name in constants if name != "head_bias_ptr"})
    source = GluonASTSource(
        KERNEL, signature, constexprs={(KERNEL.arg_names.index(n),): v for n, v in constants.items()}
    )
    return triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=hopper.MAX_REGISTERS)
    )


def ptxas_report(ptx: str, tmp_path) -> str:
    path = tmp_path / "kernel.ptx"
    path.write_text(ptx)
    result = subprocess.run(
        [get_ptxas(90).path, "-v", "-arch=sm_90a", str(path), "-o", os.devnull],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stderr


@pytest.mark.parametrize(
    "dtype,causal,head_bias,group",
    [
        (torch.bfloat16, False, False, 1),
        (torch.bfloat16, True, True, 4),
        (torch.float16, True, False, 1),
        (torch.float16, False, True, 2),
    ],
    ids=["bf16-full", "bf16-causal-headbias-G4", "fp16-causal", "fp16-full-headbias-G2"],
)
def test_compiles_for_sm90a_without_spills(dtype, causal, head_bias, group, tmp_path):
    compiled = compile_sm90(dtype, causal, head_bias, group)
    ptx = compiled.asm["ptx"]
    # The schedule the module docstring describes: products awaited one group at a time, registers moved
    # from the loader warp to the consumers, one tanh per score.
    assert "wgmma.wait_group.sync.aligned 1;" in ptx
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+240;", ptx)
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+24;", ptx)
    assert "tanh.approx.f32" in ptx
    report = ptxas_report(ptx, tmp_path)
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report


def _tensors(head_dim=128, dtype=torch.bfloat16, sk=256):
    q = torch.empty(2, 100, 4, head_dim, dtype=dtype)
    k = torch.empty(2, sk, 2, head_dim, dtype=dtype)
    return q, k, torch.empty_like(k), torch.empty_like(q)


def test_unsupported_names_what_it_cannot_run():
    full, causal = (-1, -1), (-1, 0)
    assert hopper.unsupported(*_tensors(), full, None) is None
    assert hopper.unsupported(*_tensors(), causal, None) is None
    assert "head dim 64" in hopper.unsupported(*_tensors(head_dim=64), full, None)
    assert "dtype" in hopper.unsupported(*_tensors(dtype=torch.float32), full, None)
    assert hopper.unsupported(*_tensors(), full, torch.ones(2, 4)) == "ALiBi"
    assert "window" in hopper.unsupported(*_tensors(), (16, 0), None)
    assert "window" in hopper.unsupported(*_tensors(), (-1, 8), None)
    assert hopper.unsupported(*_tensors(sk=0), full, None) == "no keys"
    q, k, v, out = _tensors()
    strided = torch.empty(2, 100, 4, 130, dtype=torch.bfloat16)[..., :128]  # rows of 260 bytes
    assert "TMA" in hopper.unsupported(strided, k, v, out, full, None)
    assert "TMA" in hopper.unsupported(q, k, v.transpose(1, 3).contiguous().transpose(1, 3), out, full, None)


def test_cpu_tensors_never_take_the_sm90_kernel():
    assert not hopper.runs_on_sm90(*_tensors(), (-1, -1), None)
