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
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

from sigattn.ops.sigmoid_attn import compat, hopper, hopper_bwd, host, kernels, sm90
from sigattn.ops.sigmoid_attn.params import Params, Rows
from sigattn.ops.sigmoid_attn.reference import Mask

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
):
    q = torch.empty(2, 256, 4, head_dim, dtype=dtype)
    config = hopper.CONFIGS[(head_dim, causal)]
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
    signature.update(half_scale="fp32", half_scale_bias="fp32")
    max_registers, consumer_registers = config.registers
    constants = dict(
        GROUP=group,
        CAUSAL=causal,
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
    "head_dim,dtype,causal,head_bias,group,varlen,key_tail",
    [
        (128, torch.bfloat16, False, False, 1, False, False),
        (128, torch.bfloat16, True, True, 4, False, False),
        (128, torch.float16, True, False, 1, False, False),
        (128, torch.float16, False, True, 2, False, False),
        (64, torch.bfloat16, True, False, 1, False, False),
        (64, torch.float16, False, True, 2, False, False),
        (128, torch.bfloat16, False, False, 1, False, True),
        (128, torch.bfloat16, True, False, 2, False, True),
        (64, torch.bfloat16, False, False, 1, False, True),
        (128, torch.bfloat16, False, False, 2, True, True),
        (128, torch.bfloat16, True, False, 1, True, True),
        (64, torch.bfloat16, False, True, 1, True, True),
        (64, torch.float16, True, False, 4, True, True),
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
    ],
)
def test_compiles_for_sm90a_without_spills(head_dim, dtype, causal, head_bias, group, varlen, key_tail, tmp_path):
    compiled = compile_sm90(head_dim, dtype, causal, head_bias, group, varlen, key_tail)
    consumer_registers = hopper.CONFIGS[(head_dim, causal)].registers[1]
    ptx = compiled.asm["ptx"]
    # The schedule the module docstring describes: products awaited one group at a time, registers moved
    # from the loader warp to the consumers, one tanh per score.
    assert "wgmma.wait_group.sync.aligned 1;" in ptx
    assert re.search(rf"setmaxnreg\.inc\.sync\.aligned\.u32\s+{consumer_registers};", ptx)
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+24;", ptx)
    assert "tanh.approx.f32" in ptx
    report = ptxas_report(ptx, tmp_path)
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report


def _tensors(head_dim=128, dtype=torch.bfloat16, sk=256):
    q = torch.empty(2, 100, 4, head_dim, dtype=dtype)
    k = torch.empty(2, sk, 2, head_dim, dtype=dtype)
    return q, k, torch.empty_like(k), torch.empty_like(q)


FULL, CAUSAL = Params(0.1), Params(0.1, Mask(causal=True))


def _window(left: int, right: int) -> Params:
    return Params(0.1, Mask(window=(left, right)))


def _forward_why(q, k, v, out, params=FULL, alibi=None):
    return hopper.unsupported(q, k, v, out, params, alibi, Rows.dense(q, k))


def test_unsupported_names_what_it_cannot_run():
    assert _forward_why(*_tensors()) is None
    assert _forward_why(*_tensors(), CAUSAL) is None
    assert _forward_why(*_tensors(), _window(-1, 0)) is None  # a window that is the causal mask
    assert _forward_why(*_tensors(head_dim=64)) is None
    assert "head dim 96" in _forward_why(*_tensors(head_dim=96))
    assert "dtype" in _forward_why(*_tensors(dtype=torch.float32))
    assert _forward_why(*_tensors(), alibi=torch.ones(2, 4)) == "ALiBi"
    assert "window" in _forward_why(*_tensors(), _window(16, 0))
    assert "window" in _forward_why(*_tensors(), _window(-1, 8))
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
    assert hopper_bwd.unsupported(do, q, k, v, grads, CAUSAL, 0.0, None, Rows.dense(q, k)) == reason


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
    signature.update(scale="fp32", half_scale="fp32", half_scale_bias="fp32")
    constants = dict(
        GROUP=group,
        CAUSAL=causal,
        STAGES=hopper_bwd.STAGES[head_dim],
        HEAVY_FIRST=causal,
        HEAD_BIAS=head_bias,
        SEQUENCE_BIAS=varlen and not head_bias,
        VARLEN=varlen,
        TAIL=varlen or tail,
    )
    if not head_bias:  # launched with None: Triton makes them constants
        constants.update(head_bias_ptr=None, dbias_ptr=None)
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
    "varlen,tail", [(False, False), (False, True), (True, True)], ids=["dense", "dense-tail", "varlen"]
)
def test_backward_compiles_for_sm90a(head_dim, dtype, causal, group, head_bias, max_spill, varlen, tail, tmp_path):
    kernel = compile_bwd_sm90(head_dim, dtype, causal, group, head_bias, varlen, tail)
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
    def why(q, k, v, do, grads, params=FULL, alibi=None, bias=0.0):
        return hopper_bwd.unsupported(do, q, k, v, grads, params, bias, alibi, Rows.dense(q, k))

    assert why(*_bwd_tensors()) is None
    assert why(*_bwd_tensors(head_dim=64), CAUSAL) is None
    assert "head dim 96" in why(*_bwd_tensors(head_dim=96))
    assert "deterministic" in why(*_bwd_tensors(), Params(0.1, deterministic=True))
    # A per-head bias: its gradient is summed by the kernel at D64; at D128 the Triton backward is faster.
    assert why(*_bwd_tensors(head_dim=64), bias=torch.zeros(4)) is None
    assert why(*_bwd_tensors(), bias=torch.zeros(4)) == "per-head bias at head dim 128: the Triton backward is faster"
    assert "dtype" in why(*_bwd_tensors(dtype=torch.float32))
    assert why(*_bwd_tensors(), alibi=torch.ones(2, 4)) == "ALiBi"
    assert "window" in why(*_bwd_tensors(), _window(16, 0))
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

    why = hopper_bwd.unsupported(do, q, k, v, grads, CAUSAL, None, None, packed(128, 300))
    assert why == "128 queries: the Triton backward is faster up to 256"
    assert hopper_bwd.unsupported(do, q, k, v, grads, CAUSAL, None, None, packed(257, 300)) is None
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
