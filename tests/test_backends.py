"""Backend selection: $SIGATTN_BACKEND, ``use_backend``, ``explain`` and auto fallback; and the "torch"
and "reference" backends computing the same function."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import Case, forward_backward

import sigattn
from sigattn import backends
from sigattn.backends import AttnCall, BackendNotSupportedError, explain, requested_backend, select_backend
from sigattn.ops.sigmoid_attn.reference import Mask


class Spy:
    """Wraps a backend and counts the calls it serves."""

    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, inner.name, 0

    def not_supported_reasons(self, call):
        return self.inner.not_supported_reasons(call)

    def __call__(self, call):
        self.calls += 1
        return self.inner(call)


class Declining:
    """A backend that cannot serve float64 and says why."""

    name = "declining"

    def __init__(self):
        self.calls = 0

    def not_supported_reasons(self, call):
        return ["float64 inputs (this backend takes float32)"] if call.q.dtype == torch.float64 else []

    def __call__(self, call):
        self.calls += 1
        return backends.BACKENDS["torch"](call)


@pytest.fixture
def spies(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    found = {}
    for name in ("torch", "reference"):
        found[name] = Spy(backends.BACKENDS[name])
        monkeypatch.setitem(backends.BACKENDS, name, found[name])
    return found


def small_call(dtype=torch.float64) -> AttnCall:
    q, k = torch.randn(1, 3, 2, 8, dtype=dtype), torch.randn(1, 4, 2, 8, dtype=dtype)
    return AttnCall("dense", q, k, k.clone(), 0.35, None, Mask(), None, False)


def run_dense():
    q, k = torch.randn(1, 3, 2, 8, dtype=torch.float64), torch.randn(1, 4, 2, 8, dtype=torch.float64)
    return sigattn.sigmoid_attn_func(q, k, k.clone())


@pytest.mark.parametrize("name", ["torch", "reference"])
def test_env_var_forces_backend(name, spies, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, name)
    assert requested_backend() == name
    assert select_backend(small_call()).name == name
    run_dense()
    assert spies[name].calls == 1
    assert sum(s.calls for s in spies.values()) == 1


def test_env_var_blank_means_auto(spies, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "  ")
    assert requested_backend() == "auto"
    monkeypatch.setenv(backends.ENV_VAR, " reference ")
    assert requested_backend() == "reference"


@pytest.mark.parametrize("name", ["torch", "reference"])
def test_use_backend_forces_and_overrides_env(name, spies, monkeypatch):
    other = "reference" if name == "torch" else "torch"
    monkeypatch.setenv(backends.ENV_VAR, other)
    with sigattn.use_backend(name):
        assert requested_backend() == name
        run_dense()
        with sigattn.use_backend(other):  # nested: the innermost wins, then the outer is restored
            run_dense()
        assert requested_backend() == name
        run_dense()
    assert requested_backend() == other
    assert spies[name].calls == 2 and spies[other].calls == 1


def test_use_backend_is_thread_local(spies):
    seen = {}
    with sigattn.use_backend("reference"):
        thread = threading.Thread(target=lambda: seen.setdefault("other_thread", requested_backend()))
        thread.start()
        thread.join()
        assert requested_backend() == "reference"
    assert seen["other_thread"] == "auto"


def test_use_backend_restores_after_an_exception(spies):
    with pytest.raises(RuntimeError), sigattn.use_backend("reference"):
        raise RuntimeError("boom")
    assert requested_backend() == "auto"


def test_invalid_names_raise_naming_the_variable(spies, monkeypatch):
    bad_name = r"use_backend\(name\) must be one of .*'torch'.*got 'trition'"
    with pytest.raises(ValueError, match=bad_name), sigattn.use_backend("trition"):
        pass
    monkeypatch.setenv(backends.ENV_VAR, "trition")
    with pytest.raises(ValueError, match=r"\$SIGATTN_BACKEND must be one of .*'reference'.*got 'trition'"):
        run_dense()
    with sigattn.use_backend("torch"):  # the context manager wins over a bad environment
        run_dense()
    assert spies["torch"].calls == 1


def test_auto_on_cpu_uses_torch(spies):
    assert requested_backend() == "auto"
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        assert select_backend(small_call(dtype)).name == "torch"
    run_dense()
    assert spies["torch"].calls == 1 and spies["reference"].calls == 0


def test_explain_names_the_backend_and_why_not_each_other(spies, monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "declining", Declining())
    plan = explain(small_call())
    assert plan["backend"] == "torch" and plan["kernels"] == {}
    assert plan["why_not"]["declining"] == ["float64 inputs (this backend takes float32)"]
    assert plan["why_not"]["reference"] == ["not tried by auto (force it with use_backend or $SIGATTN_BACKEND)"]
    assert "triton" in plan["why_not"] and "torch" not in plan["why_not"]
    assert all(isinstance(r, str) and r for rs in plan["why_not"].values() for r in rs)
    with sigattn.use_backend("declining"):
        assert explain(small_call(torch.float32))["backend"] == "declining"
        assert explain(small_call())["backend"] is None  # the call would raise
    assert spies["torch"].calls == 0  # explaining runs nothing


def test_explain_names_the_kernel_of_each_direction(monkeypatch):
    """On the 'triton' backend (here the interpreter's) explain names each direction's kernel and why the ones
    before it declined, as the kernels' own rule (ops/sigmoid_attn/kernels.py) decides."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 8, 2, 16, dtype=torch.float16)
    with sigattn.use_backend("triton"):
        plan = explain(AttnCall("dense", q, q, q, 0.25, None, Mask(causal=True), None, False))
    assert plan["backend"] == "triton"
    assert plan["kernels"] == {"forward": "triton", "backward": "triton"}
    interpreter = ["Triton's interpreter (it runs only the Triton kernels)"]
    assert plan["why_not"]["gluon-sm90 forward"] == plan["why_not"]["gluon-sm90 backward"] == interpreter


def test_forced_backend_that_declines_says_why(spies, monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "declining", Declining())
    with sigattn.use_backend("declining"):
        with pytest.raises(BackendNotSupportedError, match=r"'declining'.*dense.*float64 inputs"):
            run_dense()
        with pytest.raises(ValueError):  # BackendNotSupportedError is a ValueError
            run_dense()


def test_auto_falls_back_in_order(spies, monkeypatch):
    declining = Declining()
    monkeypatch.setitem(backends.BACKENDS, "declining", declining)
    monkeypatch.setattr(backends, "AUTO_ORDER", ["declining", "reference", "torch"])
    run_dense()  # float64: declined, so the next in order serves it
    assert declining.calls == 0 and spies["reference"].calls == 1
    q = torch.randn(1, 3, 2, 8)
    sigattn.sigmoid_attn_func(q, q, q)  # float32: the first in order serves it
    assert declining.calls == 1 and spies["reference"].calls == 1


def test_auto_with_no_backend_left_lists_every_reason(spies, monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "declining", Declining())
    monkeypatch.setattr(backends, "AUTO_ORDER", ["declining"])
    with pytest.raises(BackendNotSupportedError, match=r"no backend can run this dense call: declining: float64"):
        run_dense()


# The two PyTorch backends compute the same function.

AGREE_CASES = [
    Case(2, 17, 40, 4, 2, 16, causal=True, alibi="BH", bias="tensor"),
    Case(1, 40, 9, 4, 1, 16, window=(3, 2), bias="float"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", AGREE_CASES, ids=[c.id for c in AGREE_CASES])
def test_reference_and_torch_backends_agree(case, dtype):
    args = case.inputs(dtype, requires_grad=True)
    dout = torch.randn_like(args["q"])
    results = {}
    for name in ("torch", "reference"):
        with sigattn.use_backend(name):
            results[name] = forward_backward(sigattn.sigmoid_attn_func, args, dout)
    (out_t, grads_t), (out_r, grads_r) = results["torch"], results["reference"]
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out_t, out_r, atol=tol, rtol=tol)
    assert grads_t.keys() == grads_r.keys()
    for n in grads_t:
        torch.testing.assert_close(grads_t[n], grads_r[n], atol=tol, rtol=tol, msg=lambda m, n=n: f"d{n}: {m}")


def test_backends_agree_on_varlen_kvcache_and_sdpa():
    q, k, v = torch.randn(30, 4, 16, dtype=torch.float64), torch.randn(25, 2, 16, dtype=torch.float64), None
    v = torch.randn_like(k)
    cu_q, cu_k = (
        torch.tensor([0, 10, 10, 30], dtype=torch.int32),
        torch.tensor([0, 5, 12, 25], dtype=torch.int32),
    )
    qc = torch.randn(3, 2, 4, 16, dtype=torch.float64)
    cache = torch.randn(3, 12, 2, 16, dtype=torch.float64)
    seqlens = torch.tensor([0, 4, 9], dtype=torch.int32)
    qs, ks = torch.randn(2, 4, 9, 16, dtype=torch.float64), torch.randn(2, 4, 11, 16, dtype=torch.float64)
    mask = torch.rand(2, 1, 9, 11) > 0.3
    results = {}
    for name in ("torch", "reference"):
        with sigattn.use_backend(name):
            results[name] = (
                sigattn.sigmoid_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 13, causal=True),
                sigattn.sigmoid_attn_with_kvcache(
                    qc,
                    cache.clone(),
                    cache.clone(),
                    qc[:, :, :2],
                    qc[:, :, 2:],
                    cache_seqlens=seqlens,
                    causal=True,
                ),
                sigattn.scaled_dot_product_sigmoid_attention(qs, ks, ks, attn_mask=mask),
                sigattn.scaled_dot_product_sigmoid_attention(qs, ks, ks, is_causal=True),
            )
    for got, want in zip(results["torch"], results["reference"], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
