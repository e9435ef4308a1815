"""host.py on the CPU: the cheap descriptor equals the checked one, the TMA rule matches its definition, and
the direct launch is sound: a kernel compiles once per key, and the Gluon kernels' specialisation depends on
nothing their launchers leave out of the key."""

import dataclasses
import itertools

import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import create_function_from_signature

from sigattn.ops.sigmoid_attn import hopper, hopper_bwd, host


def test_cdiv():
    for a, b in itertools.product(range(0, 40), (1, 2, 3, 16, 64)):
        assert host.cdiv(a, b) == (a + b - 1) // b


def test_descriptor_has_the_fields_of_the_checked_constructor():
    for dtype, cols in ((torch.bfloat16, None), (torch.float16, None), (torch.float32, 64)):
        t = torch.empty(2, 100, 3, 128, dtype=dtype)[:, 1:]  # strided, still 16-byte aligned
        ours = host.descriptor(t, 64, cols)
        block = [1, 64, 1, cols or 128]
        checked = TensorDescriptor(t, list(t.shape), list(t.stride()), block, host._smem_layout(tuple(block), dtype))
        # Every field of the installed Triton's descriptor (3.7 added round_f32_to_tf32): the launcher reads them.
        for field in (f.name for f in dataclasses.fields(TensorDescriptor) if f.name != "base"):
            assert getattr(ours, field) == getattr(checked, field), field
        assert ours.base is t


def test_tma_addressable_is_its_definition():
    def definition(t):
        size = t.element_size()
        return t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(s * size % 16 == 0 for s in t.stride()[:-1])

    base = torch.empty(4, 40, 6, 24, dtype=torch.bfloat16)
    views = [
        base,
        base[:, 1:],
        base[:, :, 1:],
        base[..., 1:],
        base[..., 8:],
        base[..., :16],
        base[..., ::2],
        base.transpose(1, 2),
        base.transpose(2, 3),
        torch.empty(2, 5, 3, 8, dtype=torch.float32)[:, :, :, :4],
        torch.empty(2, 5, 3, 4, dtype=torch.float32),
        torch.empty(2, 5, 3, 2, dtype=torch.float32),
        torch.empty(3 * 5 * 4 * 8 + 1, dtype=torch.float16)[1:].view(3, 5, 4, 8),
    ]
    results = [host.tma_addressable(t) for t in views]
    assert results == [definition(t) for t in views]
    assert True in results and False in results


class FakeCompiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class FakeKernel:
    """Records JIT launches (kernel[grid](...)), each returning a new compiled kernel."""

    def __init__(self):
        self.jit_launches, self.compiled = [], []

    def __getitem__(self, grid):
        def jit(*args, **options):
            self.jit_launches.append((grid, args, options))
            self.compiled.append(FakeCompiled())
            return self.compiled[-1]

        return jit


@pytest.fixture
def fake_driver(monkeypatch):
    class Active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 1234)

    monkeypatch.setattr(host, "driver", type("Driver", (), {"active": Active()}))
    monkeypatch.setattr(host, "_compiled", {})


def test_launch_compiles_once_per_key_then_runs_the_compiled_kernel(fake_driver):
    kernel = FakeKernel()
    host.launch(kernel, (1, 2, 3), ("a", 7, True), ("bf16", True), num_warps=4)
    host.launch(kernel, (4, 5, 6), ("b", 8, True), ("bf16", True), num_warps=4)
    host.launch(kernel, (1, 1, 1), ("c", 9, False), ("bf16", False), num_warps=4)
    assert [(g, a) for g, a, _ in kernel.jit_launches] == [((1, 2, 3), ("a", 7, True)), ((1, 1, 1), ("c", 9, False))]
    assert kernel.jit_launches[0][2] == {"num_warps": 4}
    first, second = kernel.compiled
    assert first.runs == [(4, 5, 6, 1234, "function", "metadata", None, None, None, "b", 8, True)]
    assert second.runs == []


def test_launch_hooks_take_the_jit_path(fake_driver):
    from triton import knobs

    kernel = FakeKernel()
    host.launch(kernel, (1, 1, 1), (1,), ("k",))
    hook = lambda *args: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        host.launch(kernel, (1, 1, 1), (2,), ("k",))
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(kernel.jit_launches) == 2 and kernel.compiled[0].runs == []


def specialization(kernel, args):
    binder = create_function_from_signature(kernel.signature, kernel.params, CUDABackend(GPUTarget("cuda", 90, 32)))
    return binder(*args)[1]


def test_forward_kernel_specialises_on_nothing_outside_its_key():
    q = torch.empty(2, 256, 4, 128, dtype=torch.bfloat16)
    descriptors = [host.descriptor(q, 64)] * 4
    aligned, unaligned = torch.empty(4), torch.empty(5)[1:]
    cu, cu_unaligned = torch.zeros(4, dtype=torch.int32), torch.zeros(5, dtype=torch.int32)[1:]
    kernel = hopper.sigmoid_attn_fwd_kernel_sm90
    constexprs = (2, True, True, True, True, True, True, True, 2, 4, 240)
    specs = [
        specialization(
            kernel, (*descriptors, out, bias, cu_q, cu_k, *ints[:3], 0.1, -0.3, ints[3], slopes, *ints[4:], *constexprs)
        )
        for out, bias, cu_q, cu_k, slopes, ints in (
            (q, aligned, cu, cu, aligned, (2048, 2048, 0, -256, 0, 0)),
            (
                torch.empty(q.numel() + 1, dtype=q.dtype)[1:],
                unaligned,
                cu_unaligned,
                cu,
                unaligned,
                (17, 1, 1, 1, 16, 1),
            ),
            (q, aligned, cu, cu_unaligned, aligned, (1, 33, -16, 16, 4, -15)),
        )
    ]
    assert specs[0] == specs[1] == specs[2]


def test_backward_kernel_specialises_on_nothing_outside_its_key():
    t = torch.empty(2, 256, 4, 64, dtype=torch.float16)
    workspace = torch.empty(2, 256, 4, 64, dtype=torch.float32)
    descriptors = [host.descriptor(t, 64)] * 4 + [host.descriptor(workspace, 64, 64)] + [host.descriptor(t, 64)] * 2
    kernel = hopper_bwd.sigmoid_attn_bwd_kernel_sm90
    aligned, unaligned = torch.empty(4), torch.empty(5)[1:]
    cu, cu_unaligned = torch.zeros(4, dtype=torch.int32), torch.zeros(5, dtype=torch.int32)[1:]
    constexprs = (1, True, True, True, 4, True, True, True, True, True)
    specs = [
        specialization(
            kernel,
            (*descriptors, *packed, dk, t, bias, dbias, cu_q, cu, *ints, 0.1, 0.05, -0.3, *window, *constexprs),
        )
        for packed, dk, bias, dbias, cu_q, ints, window in (
            ((t,) * 4, t, aligned, aligned, cu, (4, 0, 0, 2048, 2048, 0, 0), (-256, aligned, 0, 0)),
            (
                (torch.empty(t.numel() + 1, dtype=t.dtype)[1:],) * 4,
                torch.empty(t.numel() + 1, dtype=t.dtype)[1:],
                unaligned,
                aligned,
                cu_unaligned,
                (3, 1, 16, 17, 33, 1, 16),
                (1, unaligned, 16, 1),
            ),
            ((t,) * 4, t, aligned, unaligned, cu, (16, 32, 1, 1, 16, -15, 1), (16, aligned, 4, -15)),
        )
    ]
    assert specs[0] == specs[1] == specs[2]
