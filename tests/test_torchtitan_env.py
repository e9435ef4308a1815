"""``tests/test_torchtitan.py`` where torchtitan cannot be installed beside the test extra.

torchtitan 0.3.0 pins ``datasets<4.8`` (so ``huggingface-hub<2``) and transformers 5 needs
``huggingface-hub>=2.4``: pip cannot resolve both into CI's one environment. Here they go into a virtual
environment of their own that sees this interpreter's packages (torch, transformers, sigattn) and adds
torchtitan without its pins, with a ``datasets`` that accepts hub 2, as ``sigattn/integrations/README.md``
tells users; the torchtitan tests then run there in a subprocess (about 20 s of install, 40 s of tests on
a 2-core CPU). Where torchtitan is importable, they run directly and this test is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# torchtitan and what it imports that the test extra lacks, installed without their pins (--no-deps) ...
WITHOUT_PINS = (
    "torchtitan==0.3.0",
    "torchdata==0.11.0",
    "torch_checkpointing==0.1.1",
    "spmd_types==0.2.3",
    "tyro==1.0.17",
    "docstring_parser==0.18.0",
    "typeguard==4.6.1",
)
# ... and then these with their dependencies (datasets 5.2 accepts huggingface-hub 2).
WITH_DEPENDENCIES = ("datasets==5.2.0", "einops==0.8.2")


def run(command: list, env: dict, timeout: int) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in command], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{output}"
    return result


@pytest.mark.skipif(importlib.util.find_spec("torchtitan") is not None, reason="torchtitan is installed here")
def test_torchtitan_suite_in_its_own_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SIGATTN_BACKEND", "TRITON_INTERPRET")}
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", venv], env, 120)
    python = venv / "bin" / "python"
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run([*pip, "--no-deps", *WITHOUT_PINS], env, 600)
    run([*pip, *WITH_DEPENDENCIES], env, 600)
    result = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_torchtitan.py"], env, 900)
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]
