"""No crash where the kernels cannot run: a GPU older than the kernels need, kernels that do not import with
the installed Triton, and kernels that Triton's compiler fails to build. ``auto`` warns once with the reason
and serves the call on the ``torch`` backend, ``sigattn info`` shows it, and a forced ``triton`` raises
with the reason.

Without a GPU here, a CUDA call is a stand-in that the dispatcher only inspects (device, dtype, shape), the
compute capability is patched, an import failure is a real one (a kernels module that imports a Triton
module which does not exist), and a build failure is a real one of Triton's compiler (a kernel whose
``tl.static_assert`` fails, compiled for sm_90 as the GPU tests compile theirs)."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

import sigattn
from sigattn import backends, cli
from sigattn.backends import BACKENDS, AttnCall, BackendNotSupportedError, select_backend
from sigattn.ops.sigmoid_attn import flash
from sigattn.ops.sigmoid_attn.reference import Mask


@pytest.fixture(autouse=True)
def fresh_dispatcher(monkeypatch):
    """Auto requested, and no import result, build failure or warning remembered from other tests."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backends, "_import_error", [])
    monkeypatch.setattr(backends, "_failed_builds", {})
    monkeypatch.setattr(backends, "_warned", set())


def cuda_call(kind: str = "dense") -> AttnCall:
    """A bf16 call on cuda:0 as the dispatcher sees it (device, dtype, shape): it is only inspected."""
    q = types.SimpleNamespace(
        device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(1, 128, 4, 64), requires_grad=False
    )
    return AttnCall(kind, q, q, q, 0.125, None, Mask(causal=True), None, False)


def torch_reasons_are_empty(call: AttnCall) -> bool:
    return BACKENDS["torch"].not_supported_reasons(call) == []


# ------------------------------------------------------------------------------- an unsupported GPU


def test_a_gpu_older_than_ampere_runs_on_torch(monkeypatch):
    monkeypatch.setattr(backends, "_capability", lambda index: (7, 5))
    call = cuda_call()
    assert BACKENDS["triton"].not_supported_reasons(call) == ["compute capability (7, 5) (needs 8.0 or newer)"]
    assert backends._import_error == []  # the kernels are not even imported for a GPU they cannot run on
    with pytest.warns(UserWarning, match=r"runs on the slower 'torch' backend \(triton: compute capability \(7, 5\)"):
        assert select_backend(call).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert select_backend(call).name == "torch"
    with sigattn.use_backend("triton"), pytest.raises(BackendNotSupportedError, match=r"compute capability \(7, 5\)"):
        select_backend(call)
    assert "sm_75: no kernels" in backends.kernels_for_gpu((7, 5))


@pytest.mark.parametrize(
    ("capability", "says"),
    [
        ((9, 0), "Hopper (sm_90): Gluon kernels"),
        ((8, 0), "Ampere/Ada (sm_80): the Triton kernels, compiled in CI"),
        ((8, 9), "Ampere/Ada (sm_89): the Triton kernels"),
        ((10, 0), "Blackwell or newer (sm_100): the Triton kernels"),
        ((12, 0), "Blackwell or newer (sm_120): the Triton kernels"),
        (None, "no CUDA GPU: the 'torch' backend serves every call"),
    ],
)
def test_which_kernels_each_gpu_runs(capability, says):
    assert backends.kernels_for_gpu(capability).startswith(says)


# ------------------------------------------------------------------------- kernels that do not import


@pytest.fixture
def kernels_that_do_not_import(monkeypatch, tmp_path):
    """A kernels module that fails to import as ours did on Triton 3.1 (a Triton module that is missing)."""
    (tmp_path / "sigattn_broken_kernels.py").write_text("from triton.tools.no_such_module import TensorDescriptor\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(backends, "KERNELS_MODULE", "sigattn_broken_kernels")
    monkeypatch.setattr(backends, "_capability", lambda index: (9, 0))
    return (
        f"the kernels do not import with triton {triton.__version__} (ModuleNotFoundError: No module named "
        "'triton.tools.no_such_module')"
    )


def test_kernels_that_do_not_import_leave_auto_on_torch(kernels_that_do_not_import):
    reason = kernels_that_do_not_import
    call = cuda_call()
    assert BACKENDS["triton"].not_supported_reasons(call) == [reason]
    with pytest.warns(UserWarning, match="no_such_module") as record:
        assert select_backend(call).name == "torch"
    assert reason in str(record[0].message)
    with sigattn.use_backend("triton"), pytest.raises(BackendNotSupportedError) as raised:
        select_backend(call)
    assert str(raised.value) == f"backend 'triton' was requested but cannot run this dense call: {reason}"


def test_a_forced_triton_call_raises_with_the_import_failure(kernels_that_do_not_import, monkeypatch):
    """A real call (CPU tensors in Triton's interpreter, where a forced triton would run the kernels)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    with sigattn.use_backend("triton"), pytest.raises(BackendNotSupportedError, match="no_such_module"):
        sigattn.sigmoid_attn_func(q, q, q)
    with sigattn.use_backend("torch"):
        expected = sigattn.sigmoid_attn_func(q, q, q)
    torch.testing.assert_close(sigattn.sigmoid_attn_func(q, q, q), expected, rtol=0, atol=0)  # auto


def test_info_shows_kernels_that_do_not_import(kernels_that_do_not_import, capsys):
    info = cli.collect_info()
    assert info["kernels"]["import_error"] == kernels_that_do_not_import
    assert cli.main(["info"]) == 0
    assert f"kernels           {kernels_that_do_not_import}" in capsys.readouterr().out


def test_info_says_the_kernels_import(capsys):
    info = cli.collect_info()
    assert info["kernels"]["import_error"] is None
    assert info["kernels"]["on_this_device"] == backends.kernels_for_gpu(
        torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    )
    assert cli.main(["info"]) == 0
    assert "kernels           the Triton kernels import" in capsys.readouterr().out


# ------------------------------------------------------------------------ kernels that fail to build


def _never_builds(x_ptr, BLOCK: tl.constexpr):
    tl.static_assert(BLOCK < 0, "this kernel cannot be built")
    tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)


# A JITFunction for the compiler even where conftest.py has set TRITON_INTERPRET=1 (which turns @triton.jit
# into the interpreter's function).
_never_builds = JITFunction(_never_builds)


class KernelsThatFailToBuild:
    """Stands in for ``flash.sigmoid_attn_flash``: Triton's compiler raises, as it does for a kernel written
    against another Triton's API or a GPU it cannot target (counts the attempts)."""

    def __init__(self, error: Exception | None = None):
        self.calls, self.error = 0, error

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.error is not None:
            raise self.error
        source = ASTSource(_never_builds, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, constexprs={(1,): 16})
        triton.compile(source, target=GPUTarget("cuda", 90, 32))
        raise AssertionError("the kernel was built")


@pytest.fixture
def failing_build(monkeypatch):
    """Calls on CPU tensors that the kernels accept (as a supported GPU's would be), and a build that fails."""
    monkeypatch.setattr(backends.TritonBackend, "_device_reasons", staticmethod(lambda device: []))
    kernels = KernelsThatFailToBuild()
    monkeypatch.setattr(flash, "sigmoid_attn_flash", kernels)
    return kernels


def bf16_inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 9, 2, 16, generator=gen).to(torch.bfloat16) for _ in range(3)]


def test_a_failed_build_runs_the_call_on_torch_and_warns_once(failing_build):
    q, k, v = bf16_inputs()
    with sigattn.use_backend("torch"):
        expected = sigattn.sigmoid_attn_func(q, k, v, causal=True)
    with pytest.warns(UserWarning) as record:
        out = sigattn.sigmoid_attn_func(q, k, v, causal=True)
    assert len(record) == 1
    message = str(record[0].message)
    assert "runs on the slower 'torch' backend (triton: its kernels failed to build for calls like this one " in message
    assert f"(triton {triton.__version__}, cpu: CompileTimeAssertionFailure: this kernel cannot be built)" in message
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert failing_build.calls == 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; the kernels are not tried again for calls like it
        torch.testing.assert_close(sigattn.sigmoid_attn_func(q, k, v, causal=True), expected, rtol=0, atol=0)
    assert failing_build.calls == 1
    call = AttnCall("dense", q, k, v, 0.25, None, Mask(causal=True), None, False)
    assert "its kernels failed to build" in BACKENDS["triton"].not_supported_reasons(call)[0]
    assert torch_reasons_are_empty(call)

    sigattn.sigmoid_attn_func(q, k, v, causal=False)  # another kind of call tries the kernels again
    assert failing_build.calls == 2


def test_a_forced_triton_raises_with_the_build_failure(failing_build):
    q, k, v = bf16_inputs()
    with sigattn.use_backend("triton"), pytest.raises(BackendNotSupportedError) as raised:
        sigattn.sigmoid_attn_func(q, k, v)
    assert "backend 'triton' was requested but cannot run this dense call: its kernels failed to build" in str(
        raised.value
    )
    assert isinstance(raised.value.__cause__, triton.compiler.errors.CompileTimeAssertionFailure)
    with sigattn.use_backend("triton"), pytest.raises(BackendNotSupportedError, match="failed to build"):
        sigattn.sigmoid_attn_func(q, k, v)  # remembered: refused before the kernels are tried
    assert failing_build.calls == 1


def test_other_errors_of_the_kernels_are_not_taken_for_build_failures(failing_build):
    """Only Triton's compiler (or an import) makes a build failure: any other error is the call's own."""
    failing_build.error = RuntimeError("CUDA error: an illegal memory access was encountered")
    q, k, v = bf16_inputs()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        sigattn.sigmoid_attn_func(q, k, v)
    assert backends._failed_builds == {}
