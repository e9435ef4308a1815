"""The ``sigattn`` command: ``info`` (text and JSON) reports the dispatcher's choice for each public
function and follows $SIGATTN_BACKEND; ``example`` checks a small attention against the reference and
fails when it is wrong; bad settings give a one-line error, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sigattn
from sigattn import backends, cli
from sigattn.backends import BACKENDS
from sigattn.ops.sigmoid_attn.reference import sigmoid_attn_reference

REPO = Path(__file__).resolve().parents[1]
FUNCTIONS = {
    "sigmoid_attn_func",
    "sigmoid_attn_varlen_func",
    "sigmoid_attn_with_kvcache",
    "scaled_dot_product_sigmoid_attention",
}
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the choice made for CPU tensors")


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("SIGATTN_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def info_json(capsys) -> dict:
    status, out, err = run(capsys, "info", "--json")
    assert status == 0, err
    return json.loads(out)


def test_info_prints_versions_device_env_and_every_function(capsys):
    status, out, _ = run(capsys, "info")
    assert status == 0
    assert f"torch             {torch.__version__}" in out
    assert f"sigattn           {sigattn.__version__}" in out
    for line in (
        "numpy",
        "device",
        "TRITON_INTERPRET  (unset)",
        "SIGATTN_BACKEND   (unset)",
        "requested backend auto",
    ):
        assert line in out
    for name in FUNCTIONS:
        assert f"  {name}" in out


@cpu_only
def test_info_json_reports_the_torch_backend_on_cpu(capsys):
    info = info_json(capsys)
    assert info["device"] == {"type": "cpu", "name": info["device"]["name"], "capability": None}
    assert info["requested_backend"] == "auto"
    assert info["example"]["dtype"] == "float32"
    assert set(info["functions"]) == FUNCTIONS
    for name, choice in info["functions"].items():
        assert choice["backend"] == "torch", name
        assert set(choice["why_not"]) == set(BACKENDS) - {"torch"}
        assert all(choice["why_not"].values()), f"{name}: a backend without a reason: {choice['why_not']}"
        assert choice["why_not"]["reference"] == ["not tried by auto (force it with use_backend or $SIGATTN_BACKEND)"]


def test_auto_takes_the_first_backend_that_can_run(monkeypatch, capsys):
    monkeypatch.setattr(backends, "AUTO_ORDER", ["reference", "torch"])
    info = info_json(capsys)
    assert info["auto_order"] == ["reference", "torch"]
    for choice in info["functions"].values():
        assert choice["backend"] == "reference"
        assert choice["why_not"]["torch"] == ["'reference' comes first in the auto order"]


def test_info_follows_sigattn_backend(monkeypatch, capsys):
    monkeypatch.setenv("SIGATTN_BACKEND", "reference")
    info = info_json(capsys)
    assert info["env"]["SIGATTN_BACKEND"] == "reference"
    assert info["requested_backend"] == "reference"
    for choice in info["functions"].values():
        assert choice["backend"] == "reference"
        assert choice["why_not"]["torch"] == ["not requested ('reference' is forced)"]
    _, out, _ = run(capsys, "info")
    assert "requested backend reference" in out
    assert "sigmoid_attn_func                      -> reference" in out


@cpu_only
@pytest.mark.skipif("triton" not in BACKENDS, reason="no triton backend registered")
def test_forced_backend_that_cannot_run_is_reported(monkeypatch, capsys):
    monkeypatch.setenv("SIGATTN_BACKEND", "triton")
    info = info_json(capsys)
    choice = info["functions"]["sigmoid_attn_func"]
    assert choice["backend"] is None
    assert choice["why_not"]["triton"], "the forced backend must say why it declines"
    status, _, err = run(capsys, "example")
    assert status == 2
    assert "backend 'triton' was requested but cannot run" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["info", "example"])
def test_bad_sigattn_backend_is_a_clear_error(monkeypatch, capsys, command):
    monkeypatch.setenv("SIGATTN_BACKEND", "bogus")
    status, out, err = run(capsys, command)
    assert status == 2
    assert out == ""
    assert err.startswith(f"sigattn {command}: error: $SIGATTN_BACKEND must be one of ")
    assert "'torch'" in err and "got 'bogus'" in err


def test_example_checks_against_the_reference(capsys):
    status, out, _ = run(capsys, "example")
    assert status == 0, out
    assert f"q, k, v: ({cli.BATCH}, {cli.SEQLEN}, {cli.HEADS}, {cli.HEADDIM})" in out
    for name in ("out", "dq", "dk", "dv"):
        line = next(line for line in out.splitlines() if f"max |{name} - reference|" in line)
        assert line.endswith("ok")
    assert out.splitlines()[-1] == "ok"


def test_example_fails_on_a_wrong_result(monkeypatch, capsys):
    def off_by_a_tenth(q, k, v, causal):  # bf16's own error on this input is about 0.02
        return sigmoid_attn_reference(q, k, v, causal=causal, upcast=False) + 0.1

    monkeypatch.setattr(cli, "sigmoid_attn_func", off_by_a_tenth)
    status, out, _ = run(capsys, "example")
    assert status == 1
    assert "FAIL" in out and out.splitlines()[-1] == "FAILED"


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_python_dash_m_runs_info():
    env = {k: v for k, v in os.environ.items() if k not in ("SIGATTN_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "sigattn.cli", "info", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["versions"]["sigattn"] == sigattn.__version__
    assert set(info["functions"]) == FUNCTIONS
