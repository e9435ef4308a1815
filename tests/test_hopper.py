"""The Gluon kernels for sm_90 (hopper.py, hopper_bwd.py) on the CPU: they compile for sm_90a in the
specialisations the dispatch can ask for, fit their registers, and the dispatch rules take exactly the calls
they support. (Gluon does not run in the interpreter; ``python -m sigattn.testing.grid`` runs them on a GPU.)"""

import os
import re
import subprocess

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

from sigattn.ops.sigmoid_attn import compat, hopper, hopper_bwd, host, kernels, sm90
from sigattn.ops.sigmoid_attn.params import Params, Rows
from sigattn.ops.sigmoid_attn.reference import Mask, allowed_keys

KERNEL = hopper.sigmoid_attn_fwd_kernel_sm90

# triton.language as imported, before any kernel runs in the interpreter (tests are collected first).
_LANGUAGE = [(namespace, dict(vars(namespace))) for namespace in (tl, tl.core, tl.math, tl.core.tensor)]
_CLASS_INTERNALS = {"__dict__", "__weakref__", "__annotations__", "__doc__"}


@pytest.fixture(autouse=True)
def _pristine_triton_language():
    """Triton 3.6's interpreter patches triton.language when an interpreted kernel calls one of Triton's own
    jit functions, and never restores it (InterpretedFunction.__call__ drops its patch scope): a Gluon kernel
    compiled afterwards in the same process builds its IR through the interpreter and fails. Put back what
    was there at import."""
    for namespace, saved in _LANGUAGE:
        for name in set(vars(namespace)) - set(saved) - _CLASS_INTERNALS:
            delattr(namespace, name)
        for name, value in saved.items():
            if name not in _CLASS_INTERNALS and vars(namespace).get(name) is not value:
                setattr(namespace, name, value)


def compile_sm90(
    head_dim: int,
    dtype: torch.dtype,
    causal: bool,
    head_bias: bool,
    group: int,
    varlen: bool = False,
    key_tail: bool = False,
    left: bool = False,
    alibi: bool = False,
):
    q = torch.empty(2, 256, 4, head_dim, dtype=dtype)
    config = hopper.CONFIGS[(head_dim, causal and not left)]
    rows = int(hopper.ROWS)
    args = dict(
        q_desc=host.descriptor(q, rows),
        k_desc=host.descriptor(q, config.block_n),
        v_desc=host.descriptor(q, config.block_n),
        o_desc=host.descriptor(q, rows),
    )
    signature = {name: mangle_type(d) for name, d in args.items()}
    signature.update(o_ptr=mangle_type(q), head_bias_ptr="*fp32", cu_seqlens_q="*i32", cu_seqlens_k="*i32")
    signature.update(seqlen_q="i32", seqlen_k="i32", diag_offset="i32")
    signature.update(half_scale="fp32", half_scale_bias="fp32", lo_offset="i32")
    signature.update(alibi_ptr="*fp32", stride_alibi_b="i32", key_offset="i32")
    max_registers, consumer_registers = config.registers
    constants = dict(
        GROUP=group,
        CAUSAL=causal,
        LEFT=left,
        ALIBI=alibi,
        HEAD_BIAS=head_bias,
        SEQUENCE_BIAS=varlen and not head_bias,
        VARLEN=varlen,
        KEY_TAIL=varlen or key_tail,
        CONSUMERS=config.consumers,
        STAGES=config.stages,
        CONSUMER_REGS=consumer_registers,
    )
    if not head_bias:  # launched with None: Triton makes them constants
        constants["head_bias_ptr"] = None
    if not alibi:
        constants["alibi_ptr"] = None
    if not varlen:
        constants.update(cu_seqlens_q=None, cu_seqlens_k=None)
    signature.update({name: "constexpr" for name in constants})
    source = GluonASTSource(
        KERNEL, signature, constexprs={(KERNEL.arg_names.index(n),): v for n, v in constants.items()}
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=max_registers))


def spill_bytes_by_registers(cubin: bytes, tmp_path) -> dict[int | None, int]:
    """Bytes of spill stores in the SASS of a warp-specialised kernel, by the register count its warps set
    last (``setmaxnreg``; None before any): which partition spills, the consumers or the loader."""
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    nvdisasm = os.path.join(os.path.dirname(get_ptxas(90).path), "nvdisasm")
    sass = subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True, check=True).stdout
    spilled, registers = {}, None
    for line in sass.splitlines():
        if (setmaxnreg := re.search(r"USETMAXREG\.\S+ (?:UP\d, )?(0x[0-9a-f]+)", line)) is not None:
            registers = int(setmaxnreg.group(1), 16)
        elif (store := re.search(r"\bSTL(\.64|\.128)?\b", line)) is not None:
            spilled[registers] = spilled.get(registers, 0) + {".64": 8, ".128": 16}.get(store.group(1), 4)
    return spilled


def ptxas_report(ptx: str, tmp_path) -> str:
    path = tmp_path / "kernel.ptx"
    path.write_text(ptx)
    result = subprocess.run(
        [get_ptxas(90).path, "-v", "-arch=sm_90a", str(path), "-o", os.devnull],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stderr


@pytest.mark.parametrize(
    "head_dim,dtype,causal,head_bias,group,varlen,key_tail,left",
    [
        (128, torch.bfloat16, False, False, 1, False, False, False),
        (128, torch.bfloat16, True, True, 4, False, False, False),
        (128, torch.float16, True, False, 1, False, False, False),
        (128, torch.float16, False, True, 2, False, False, False),
        (64, torch.bfloat16, True, False, 1, False, False, False),
        (64, torch.float16, False, True, 2, False, False, False),
        (128, torch.bfloat16, False, False, 1, False, True, False),
        (128, torch.bfloat16, True, False, 2, False, True, False),
        (64, torch.bfloat16, False, False, 1, False, True, False),
        (128, torch.bfloat16, False, False, 2, True, True, False),
        (128, torch.bfloat16, True, False, 1, True, True, False),
        (64, torch.bfloat16, False, True, 1, True, True, False),
        (64, torch.float16, True, False, 4, True, True, False),
        (128, torch.bfloat16, True, False, 1, False, False, True),
        (128, torch.float16, False, False, 2, False, True, True),
        (64, torch.bfloat16, True, True, 1, False, True, True),
        (64, torch.float16, False, False, 4, False, False, True),
    ],
    ids=[
        "D128-bf16-full",
        "D128-bf16-causal-headbias-G4",
        "D128-fp16-causal",
        "D128-fp16-full-headbias-G2",
        "D64-bf16-causal",
        "D64-fp16-full-headbias-G2",
        "D128-bf16-full-tail",
        "D128-bf16-causal-tail-G2",
        "D64-bf16-full-tail",
        "varlen-D128-bf16-full-G2",
        "varlen-D128-bf16-causal",
        "varlen-D64-bf16-full-headbias",
        "varlen-D64-fp16-causal-G4",
        "D128-bf16-window",
        "D128-fp16-left-tail-G2",
        "D64-bf16-window-tail-headbias",
        "D64-fp16-left-G4",
    ],
)
def test_compiles_for_sm90a_without_spills(head_dim, dtype, causal, head_bias, group, varlen, key_tail, left, tmp_path):
    compiled = compile_sm90(head_dim, dtype, causal, head_bias, group, varlen, key_tail, left)
    consumer_registers = hopper.CONFIGS[(head_dim, causal and not left)].registers[1]
    ptx = compiled.asm["ptx"]
    # The schedule the module docstring describes: products awaited one group at a time, registers moved
    # from the loader warp to the consumers, one tanh per score.
    assert "wgmma.wait_group.sync.aligned 1;" in ptx
    assert re.search(rf"setmaxnreg\.inc\.sync\.aligned\.u32\s+{consumer_registers};", ptx)
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+24;", ptx)
    assert "tanh.approx.f32" in ptx
    report = ptxas_report(ptx, tmp_path)
    # A window's left bound: none under Triton 3.6 (CUDA 12.8's ptxas; the release the GPU numbers are
    # from); 3.7 and 3.9 spill 8-16 bytes in the D64 window with a key tail and a per-head bias.
    limit = 32 if left and compat.VERSION != (3, 6) else 0
    assert spill_stores(report) <= limit, report


def spill_stores(report: str) -> int:
    """Bytes of spill stores in a ptxas -v report."""
    return int(re.search(r"(\d+) bytes spill stores", report).group(1))


@pytest.mark.parametrize(
    "head_dim,dtype,causal,head_bias,group,varlen,key_tail,left",
    [
        (128, torch.bfloat16, True, False, 1, False, False, False),
        (128, torch.bfloat16, False, True, 2, False, True, False),
        (128, torch.float16, True, False, 1, True, True, False),
        (128, torch.bfloat16, True, False, 4, False, True, True),
        (64, torch.bfloat16, True, False, 1, False, False, False),
        (64, torch.float16, False, False, 2, False, True, False),
        (64, torch.bfloat16, True, True, 1, False, True, True),
    ],
    ids=["D128-causal", "D128-full-tail-headbias-G2", "varlen-D128-fp16", "D128-window-G4", "D64-causal",
         "D64-fp16-full-tail-G2", "D64-window-headbias"],
)  # fmt: skip
def test_alibi_compiles_for_sm90a_without_spills(
    head_dim, dtype, causal, head_bias, group, varlen, key_tail, left, tmp_path
):
    """ALiBi's distance term: a float per row and column of a tile, then a subtraction and an FMA a score.
    (Packed sequences at D64 spill 32 bytes at 112 registers, so ``unsupported`` leaves them to Triton.)
    None under Triton 3.6, the release of the GPU numbers; the later ptxas spill 8-44 bytes, and 180-288 in
    the D64 window with a per-head bias (four groups of 112 registers)."""
    compiled = compile_sm90(head_dim, dtype, causal, head_bias, group, varlen, key_tail, left, alibi=True)
    report = ptxas_report(compiled.asm["ptx"], tmp_path)
    limit = 0 if compat.VERSION == (3, 6) else 320 if head_dim == 64 and left else 64
    assert spill_stores(report) <= limit, report


@pytest.mark.parametrize(
    "head_dim,causal,group,head_bias,varlen,tail,left,max_spill",
    [
        (64, True, 1, False, False, False, False, 0),
        (64, True, 2, True, False, True, True, 48),
        (64, False, 1, False, True, True, False, 0),
        (128, True, 1, False, False, False, False, 224),
        (128, False, 1, False, False, True, False, 224),
        (128, True, 1, False, False, True, True, 224),
        (128, True, 1, False, True, True, False, 224),
    ],
    ids=["D64-causal", "D64-window-headbias-G2", "varlen-D64-full", "D128-causal", "D128-full-tail",
         "D128-window", "varlen-D128-causal"],
)  # fmt: skip
def test_backward_with_alibi_compiles_for_sm90a(
    head_dim, causal, group, head_bias, varlen, tail, left, max_spill, tmp_path
):
    """ALiBi in the backward's recomputed scores. At D128 ptxas spills 180-210 bytes in the consumers (not
    the products: no wgmma serialised), against 52-116 without: what that costs is measured against the
    Triton backward in benchmarks/NOTES.md. Packed sequences: 132 bytes under Triton 3.6, 208 under 3.8;
    Triton 3.9 (CUDA 13.4's ptxas) spills 490-560 bytes."""
    kernel = compile_bwd_sm90(head_dim, torch.bfloat16, causal, group, head_bias, varlen, tail, left, alibi=True)
    assert "C7512" not in ptxas_report(kernel.asm["ptx"], tmp_path)
    spilled = spill_bytes_by_registers(kernel.asm["cubin"], tmp_path)
    consumers = spilled.pop(int(sm90.CONSUMER_REGISTERS), 0)
    assert consumers <= max_spill + (400 if max_spill and compat.VERSION >= (3, 9) else 0), spilled


def _tensors(head_dim=128, dtype=torch.bfloat16, sk=256):
    q = torch.empty(2, 100, 4, head_dim, dtype=dtype)
    k = torch.empty(2, sk, 2, head_dim, dtype=dtype)
    return q, k, torch.empty_like(k), torch.empty_like(q)


FULL, CAUSAL = Params(0.1), Params(0.1, Mask(causal=True))


def _window(left: int, right: int) -> Params:
    return Params(0.1, Mask(window=(left, right)))


def _forward_why(q, k, v, out, params=FULL):
    return hopper.unsupported(q, k, v, out, params, None, Rows.dense(q, k))


def test_unsupported_names_what_it_cannot_run():
    assert _forward_why(*_tensors()) is None
    assert _forward_why(*_tensors(), CAUSAL) is None
    assert _forward_why(*_tensors(), _window(-1, 0)) is None  # a window that is the causal mask
    assert _forward_why(*_tensors(head_dim=64)) is None
    assert "head dim 96" in _forward_why(*_tensors(head_dim=96))
    assert "dtype" in _forward_why(*_tensors(dtype=torch.float32))
    assert _forward_why(*_tensors(), _window(16, 0)) is None  # sliding windows, either bound or both
    assert _forward_why(*_tensors(), _window(-1, 8)) is None
    assert _forward_why(*_tensors(), _window(16, -1)) is None
    q, k, v, out = (t.flatten(0, 1) for t in _tensors())
    packed = Rows.packed(
        torch.tensor([0, 50, 200], dtype=torch.int32), torch.tensor([0, 256, 512], dtype=torch.int32), 150, 256
    )
    assert hopper.unsupported(q, k, v, out, _window(-1, 8), None, packed) is None
    assert "left bound" in hopper.unsupported(q, k, v, out, _window(16, 0), None, packed)
    slopes = torch.ones(2, 4)
    assert hopper.unsupported(q, k, v, out, CAUSAL, slopes, packed) is None  # ALiBi
    assert "ALiBi" in hopper.unsupported(*(t[..., :64] for t in (q, k, v, out)), CAUSAL, slopes, packed)
    assert hopper.unsupported(*(t[..., :64] for t in (q, k, v, out)), CAUSAL, None, packed) is None
    assert _forward_why(*_tensors(sk=0)) == "no keys"
    q, k, v, out = _tensors()
    strided = torch.empty(2, 100, 4, 130, dtype=torch.bfloat16)[..., :128]  # rows of 260 bytes
    assert "TMA" in _forward_why(strided, k, v, out)
    assert "TMA" in _forward_why(q, k, v.transpose(1, 3).contiguous().transpose(1, 3), out)
    assert _forward_why(q, k, v, None) is None  # an output buffer the entry point makes


def test_gluon_kernels_decline_a_triton_they_were_not_tested_with(monkeypatch):
    """Outside compat.SUPPORTED (3.5 lacks the warp_specialize the kernels call; 3.10 is not out) both Gluon
    kernels decline with the reason, and the Triton kernels serve the call."""
    assert [compat.unsupported_triton(v) for v in ((3, 6), (3, 7), (3, 8), (3, 9))] == [None] * 4
    reason = compat.unsupported_triton((3, 10))
    assert reason == "triton 3.10: the Gluon kernels are tested with 3.6 to 3.9"
    assert compat.unsupported_triton((3, 5)) == "triton 3.5: the Gluon kernels are tested with 3.6 to 3.9"
    monkeypatch.setattr(compat, "UNSUPPORTED_TRITON", reason)
    assert _forward_why(*_tensors()) == reason
    q, k, v, do, grads = _bwd_tensors()
    assert hopper_bwd.unsupported(do, q, k, v, grads, CAUSAL, 0.0, Rows.dense(q, k)) == reason


def test_cpu_tensors_never_take_the_sm90_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)  # (in the interpreter, that is the reason)
    q, k, v, out = _tensors()
    kernel, declined = kernels.choose(kernels.FORWARD, q, k, v, out, FULL, 0.0, None, Rows.dense(q, k))
    assert kernel.name == "triton" and declined == {"gluon-sm90": "cpu tensors"}


def compile_bwd_sm90(
    head_dim: int,
    dtype: torch.dtype,
    causal: bool,
    group: int,
    head_bias: bool = False,
    varlen: bool = False,
    tail: bool = False,
    left: bool = False,
    alibi: bool = False,
):
    kernel = hopper_bwd.sigmoid_attn_bwd_kernel_sm90
    t = torch.empty(2, 256, 4, head_dim, dtype=dtype)
    workspace = torch.empty(2, 256, 4, head_dim, dtype=torch.float32)
    rows, keys = int(hopper_bwd.ROWS), int(hopper_bwd.KEYS)
    descriptors = dict(
        q_desc=host.descriptor(t, rows),
        k_desc=host.descriptor(t, keys),
        v_desc=host.descriptor(t, keys),
        do_desc=host.descriptor(t, rows),
        dq_desc=host.descriptor(workspace, rows, int(hopper_bwd.DQ_COLS)),
        dk_desc=host.descriptor(t, keys),
        dv_desc=host.descriptor(t, keys),
    )
    signature = {name: mangle_type(d) for name, d in descriptors.items()}
    signature.update({name: mangle_type(t) for name in ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr")})
    signature.update(head_bias_ptr="*fp32", dbias_ptr="*fp32")
    signature.update(cu_seqlens_q="*i32", cu_seqlens_k="*i32", num_heads="i32", b0="i32", h0="i32")
    signature.update(seqlen_q="i32", seqlen_k="i32", diag_offset="i32", q_shift="i32")
    signature.update(scale="fp32", half_scale="fp32", half_scale_bias="fp32", lo_offset="i32")
    signature.update(alibi_ptr="*fp32", stride_alibi_b="i32", key_offset="i32")
    constants = dict(
        GROUP=group,
        CAUSAL=causal,
        LEFT=left,
        ALIBI=alibi,
        STAGES=hopper_bwd.STAGES[head_dim],
        HEAVY_FIRST=causal and not left,
        HEAD_BIAS=head_bias,
        SEQUENCE_BIAS=varlen and not head_bias,
        VARLEN=varlen,
        TAIL=varlen or tail,
    )
    if not head_bias:  # launched with None: Triton makes them constants
        constants.update(head_bias_ptr=None, dbias_ptr=None)
    if not alibi:
        constants.update(alibi_ptr=None)
    if not varlen:
        constants.update(
            q_ptr=None,
            k_ptr=None,
            v_ptr=None,
            do_ptr=None,
            dk_ptr=None,
            dv_ptr=None,
            cu_seqlens_q=None,
            cu_seqlens_k=None,
        )
    signature.update({name: "constexpr" for name in constants})
    source = GluonASTSource(
        kernel, signature, constexprs={(kernel.arg_names.index(n),): v for n, v in constants.items()}
    )
    options = dict(num_warps=4, maxnreg=hopper_bwd.MAX_REGISTERS)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.parametrize(
    "head_dim,dtype,causal,group,head_bias,max_spill",
    [
        (128, torch.bfloat16, False, 1, False, 128),
        (128, torch.float16, True, 2, False, 128),
        (64, torch.bfloat16, True, 4, False, 0),
        (64, torch.float16, False, 1, False, 0),
        (64, torch.bfloat16, True, 2, True, 0),
    ],
    ids=["D128-bf16-full", "D128-fp16-causal-G2", "D64-bf16-causal-G4", "D64-fp16-full", "D64-bf16-causal-G2-headbias"],
)
@pytest.mark.parametrize(
    "varlen,tail,left",
    [(False, False, False), (False, True, False), (True, True, False), (False, True, True)],
    ids=["dense", "dense-tail", "varlen", "dense-window"],
)
def test_backward_compiles_for_sm90a(
    head_dim, dtype, causal, group, head_bias, max_spill, varlen, tail, left, tmp_path
):
    kernel = compile_bwd_sm90(head_dim, dtype, causal, group, head_bias, varlen, tail, left)
    ptx = kernel.asm["ptx"]
    # dQ leaves through TMA reductions; registers move from the loader warp to the two consumer groups.
    assert "cp.reduce.async.bulk.tensor" in ptx and ".add" in ptx
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+240;", ptx)
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+24;", ptx)
    assert "tanh.approx.f32" in ptx
    # With a per-head bias, dS is summed by an 8-column product against a block of ones.
    assert ("wgmma.mma_async.sync.aligned.m64n8k16" in ptx) == head_bias
    # Packed sequences: the loader warp makes a TMA descriptor per sequence on the device, in global scratch.
    assert ("tensormap.cp_fenceproxy" in ptx) == varlen and (kernel.metadata.global_scratch_size > 0) == varlen
    report = ptxas_report(ptx, tmp_path)
    assert "C7512" not in report, report  # wgmma serialised for lack of registers
    spilled = spill_bytes_by_registers(kernel.asm["cubin"], tmp_path)
    consumers = spilled.pop(int(sm90.CONSUMER_REGISTERS), 0)
    # D128 keeps dK, dV (128 registers), the score tiles and a dQ block within 240: ptxas spills a few
    # scalars (36-120 bytes; the H100 numbers in benchmarks/results are with them), never the products. The
    # masks of tiles that end past Sq or Sk add up to 32 bytes, a packed sequence's last dQ rows 32 more.
    # Triton 3.9 compiles with CUDA 13.4's ptxas, which spills 176-204 bytes in the dense D128 consumers: on
    # an H100 that code (Triton 3.6 with 3.9's ptxas) ran the D128 backward 0.99-1.05x the time of Triton 3.6's
    # own full, 1.06-1.12x causal, still ahead of the Triton backward
    # (benchmarks/results/ptxas_ab_h100_2026-12-07.json).
    limit = max_spill + (80 if max_spill and compat.VERSION >= (3, 9) else 0) + 32 * tail + 32 * varlen
    assert consumers <= limit, spilled
    # Outside the consumers (before the partitions start, and the loader warp at 24 registers), packed
    # sequences keep the fields of the loader's sequence descriptors in local memory, stored once per
    # program: 44-72 bytes under Triton 3.6, 112-120 under 3.9, which stores them before the partitions
    # start. Dense rows spill a few scalars there (0-12 bytes).
    assert sum(spilled.values()) <= 128 * varlen + 16, spilled


def _bwd_tensors(head_dim=128, dtype=torch.bfloat16, sq=600, sk=256):
    q = torch.empty(2, sq, 4, head_dim, dtype=dtype)
    k = torch.empty(2, sk, 2, head_dim, dtype=dtype)
    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(k))
    return q, k, torch.empty_like(k), torch.empty_like(q), grads


def test_backward_unsupported_names_what_it_cannot_run():
    def why(q, k, v, do, grads, params=FULL, bias=0.0):
        return hopper_bwd.unsupported(do, q, k, v, grads, params, bias, Rows.dense(q, k))

    assert why(*_bwd_tensors()) is None
    assert why(*_bwd_tensors(head_dim=64), CAUSAL) is None
    assert "head dim 96" in why(*_bwd_tensors(head_dim=96))
    assert "deterministic" in why(*_bwd_tensors(), Params(0.1, deterministic=True))
    # A per-head bias: its gradient is summed by the kernel at D64; at D128 the Triton backward is faster.
    assert why(*_bwd_tensors(head_dim=64), bias=torch.zeros(4)) is None
    assert why(*_bwd_tensors(), bias=torch.zeros(4)) == "per-head bias at head dim 128: the Triton backward is faster"
    assert "dtype" in why(*_bwd_tensors(dtype=torch.float32))
    assert why(*_bwd_tensors(), _window(16, 0)) is None  # sliding windows, either bound or both
    assert why(*_bwd_tensors(), _window(16, -1)) is None
    assert why(*_bwd_tensors(), _window(-1, 16)) is None
    assert why(*_bwd_tensors(sk=0)) == "no keys"
    assert why(*_bwd_tensors(sq=0)) == "no queries"
    # Short calls run faster on the Triton backward: up to 512 queries at D64 causal, 128 at D128 full.
    assert why(*_bwd_tensors(head_dim=64, sq=513), CAUSAL) is None
    assert "faster" in why(*_bwd_tensors(head_dim=64, sq=512), CAUSAL)
    assert why(*_bwd_tensors(sq=129)) is None
    assert "faster" in why(*_bwd_tensors(sq=128))
    q, k, v, do, (dq, dk, dv) = _bwd_tensors()
    strided = torch.empty(2, 256, 2, 130, dtype=torch.bfloat16)[..., :128]
    assert "TMA" in why(q, k, v, do, (dq, strided, dv))
    assert why(q, k, v, None, None) is None  # buffers the entry point makes


def test_backward_dispatch_never_takes_cpu_tensors_or_deterministic_calls(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    q, k, v, do, grads = _bwd_tensors()
    rows = Rows.dense(q, k)
    kernel, declined = kernels.choose(kernels.BACKWARD, do, q, k, v, grads, CAUSAL, 0.0, None, rows)
    assert kernel.name == "triton" and declined == {"gluon-sm90": "cpu tensors"}
    # Past the device check (as on an sm_90 GPU) the rule is hopper_bwd.unsupported's; determinism comes from
    # either switch.
    monkeypatch.setattr(kernels, "_sm90_reason", lambda q: None)
    assert kernels.choose(kernels.BACKWARD, do, q, k, v, grads, CAUSAL, 0.0, None, rows)[0].name == "gluon-sm90"
    deterministic = Params(0.1, Mask(causal=True), deterministic=True)
    kernel, declined = kernels.choose(kernels.BACKWARD, do, q, k, v, grads, deterministic, 0.0, None, rows)
    assert kernel.name == "triton" and "deterministic" in declined["gluon-sm90"]
    torch.use_deterministic_algorithms(True)
    try:
        kernel, declined = kernels.choose(kernels.BACKWARD, do, q, k, v, grads, CAUSAL, 0.0, None, rows)
    finally:
        torch.use_deterministic_algorithms(False)
    assert kernel.name == "triton" and "deterministic" in declined["gluon-sm90"]


def test_packed_sequences_dispatch_as_one_row_by_their_longest_lengths(monkeypatch):
    """Packed (total, H, D) tensors reach the Gluon rules as (1, total, H, D), the backward's short-call rule
    reads the longest sequence (not the total), and a top-left diagonal stays on the Triton kernels."""
    q, k = torch.empty(600, 4, 128, dtype=torch.bfloat16), torch.empty(300, 2, 128, dtype=torch.bfloat16)
    v, do, out = torch.empty_like(k), torch.empty_like(q), torch.empty_like(q)
    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(k))
    cu = torch.tensor([0, 300, 600], dtype=torch.int32)

    def packed(max_q, max_k):
        return Rows.packed(cu, cu[:2] // 2, max_q, max_k)

    why = hopper_bwd.unsupported(do, q, k, v, grads, CAUSAL, None, packed(128, 300))
    assert why == "128 queries: the Triton backward is faster up to 256"
    assert hopper_bwd.unsupported(do, q, k, v, grads, CAUSAL, None, packed(257, 300)) is None
    monkeypatch.setattr(kernels, "_sm90_reason", lambda q: None)
    rows = packed(300, 200)
    assert kernels.choose(kernels.FORWARD, q, k, v, out, CAUSAL, None, None, rows)[0].name == "gluon-sm90"
    assert kernels.choose(kernels.BACKWARD, do, q, k, v, grads, CAUSAL, None, None, rows)[0].name == "gluon-sm90"
    top_left = Params(0.1, Mask(causal=True, top_left=True))
    assert "top left" in kernels.choose(kernels.FORWARD, q, k, v, out, top_left, None, None, rows)[1]["gluon-sm90"]
    assert (
        "top left" in kernels.choose(kernels.BACKWARD, do, q, k, v, grads, top_left, None, None, rows)[1]["gluon-sm90"]
    )
    dense = (q[None], k[None], v[None], out[None])
    assert _forward_why(*dense, top_left) is None  # dense rows: any diagonal


@pytest.mark.parametrize(
    "batch,kv_heads,seqlen,group,head_dim",
    [(4, 16, 4096, 1, 128), (1, 16, 65536, 1, 128), (32, 16, 512, 1, 128), (3, 2, 8192, 4, 64), (1, 1, 70000, 8, 128)],
)
def test_workspace_chunks_cover_the_call_within_budget(batch, kv_heads, seqlen, group, head_dim):
    per_kv_head = seqlen * group * head_dim * 4
    rows, heads = hopper_bwd._chunks(batch, kv_heads, per_kv_head, seqlen)
    budget = hopper_bwd.WORKSPACE_BYTES * max(1, hopper_bwd.WORKSPACE_KEYS // seqlen)
    assert 1 <= rows <= batch and 1 <= heads <= kv_heads
    assert rows == 1 or heads == kv_heads  # a chunk of several rows holds all their heads
    # within budget unless a single kv head of one row exceeds it (then that is the chunk)
    assert rows * heads * per_kv_head <= max(budget, per_kv_head)
    # as few launches as the budget allows
    assert rows * heads * per_kv_head * 2 > min(budget, batch * kv_heads * per_kv_head) or rows == batch


def test_memory_target_shape_keeps_the_workspace_at_32_mib():
    # sigattn bench --memory: B=1, H=16, D=128, 64k tokens; its budget is "under 64 MiB beyond the tensors".
    rows, heads = hopper_bwd._chunks(1, 16, 65536 * 128 * 4, 65536)
    assert rows * heads * 65536 * 128 * 4 == 32 << 20


@settings(max_examples=300, deadline=None)
@given(
    seqlen_q=st.integers(1, 300),
    seqlen_k=st.integers(1, 300),
    left=st.sampled_from([-1, 0, 1, 5, 63, 64, 65, 200, 299]),
    right=st.sampled_from([-1, 0, 1, 7, 64, 299]),
    causal=st.booleans(),
    top_left=st.booleans(),
)
def test_visible_keys_and_queries_bound_exactly_the_allowed_pairs(seqlen_q, seqlen_k, left, right, causal, top_left):
    """The Gluon kernels' descriptors cover host.visible_keys and (backward) host.visible_queries: every pair
    the mask allows lies inside both ranges, and their first and last members each take part in one."""
    mask = Mask(causal, (left, -1 if causal else right), top_left)
    allowed = allowed_keys(seqlen_q, seqlen_k, torch.tensor([seqlen_k]), mask)[0, 0].expand(seqlen_q, seqlen_k)
    diag_offset = 0 if top_left else seqlen_k - seqlen_q
    keys = host.visible_keys(seqlen_q, seqlen_k, diag_offset, mask.bounds)
    queries = host.visible_queries(seqlen_q, seqlen_k, diag_offset, mask.bounds)
    seen_keys, seen_queries = allowed.any(0).nonzero().flatten(), allowed.any(1).nonzero().flatten()
    for (first, last), seen in ((keys, seen_keys), (queries, seen_queries)):
        if seen.numel() == 0:
            assert first == last
        else:
            assert (first, last) == (seen.min().item(), seen.max().item() + 1)
            assert seen.numel() == last - first  # the windows of consecutive rows leave no gap
