"""The code as ruff checks and formats it (``pyproject.toml``'s ``[tool.ruff]``): CI fails on a lint finding
or on a file ``ruff format`` would change. ruff is pinned in the ``test`` extra, since its formatting moves
between releases."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff(command):
    result = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
