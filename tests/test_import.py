"""A fast import: the public functions do not import ``torch._dynamo`` (about a second of a 2-core CPU),
``sigattn --version`` and ``--help`` do not import torch at all, and the version has one source.

Each check runs in a fresh interpreter, since this one has imported everything already."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sigattn
from sigattn import __main__ as entry
from sigattn import backends, cli

REPO = Path(__file__).resolve().parents[1]


def modules_after(code: str) -> tuple[set[str], subprocess.CompletedProcess]:
    """The modules a fresh interpreter holds after running ``code`` (and its result)."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stderr.strip().splitlines()[-1])), result


def test_public_functions_do_not_import_dynamo():
    names = ", ".join(sigattn.__all__)
    loaded, _ = modules_after(f"from sigattn import {names}\nimport sigattn.nn, sigattn.models")
    assert "torch" in loaded and "sigattn.functional" in loaded  # the check would be empty otherwise
    assert "torch._dynamo" not in loaded


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_do_not_import_torch(flag):
    code = f"from sigattn.__main__ import main\ntry:\n    main([{flag!r}])\nexcept SystemExit as end:\n"
    code += "    assert not end.code"
    loaded, result = modules_after(code)
    assert "sigattn" in loaded
    assert not {name for name in loaded if name == "torch" or name.startswith("torch.")}
    expected = f"sigattn {sigattn.__version__}" if flag == "--version" else "usage: sigattn [-h] [--version] COMMAND"
    assert result.stdout.startswith(expected)


def test_python_m_sigattn_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "sigattn", "--version"], capture_output=True, text=True, cwd=REPO)
    assert (result.returncode, result.stdout) == (0, f"sigattn {sigattn.__version__}\n"), result.stderr
    result = subprocess.run([sys.executable, "-m", "sigattn"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "the following arguments are required: COMMAND" in result.stderr


def test_top_level_help_is_the_full_parsers():
    """``sigattn --help`` is answered from ``__main__.COMMANDS``: it must say what ``cli.build_parser`` does
    (a command added there must be added to COMMANDS too)."""
    assert entry.top_level_parser().format_help() == cli.build_parser().format_help()


def test_the_version_comes_from_the_package_metadata():
    """pyproject.toml is the one place the version is written; ``sigattn.__version__`` reads the installed
    metadata (``pip install -e .`` refreshes it)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert sigattn.__version__ == importlib.metadata.version("sigattn") == declared
    written = [p for p in (REPO / "sigattn").rglob("*.py") if f'"{declared}"' in p.read_text(encoding="utf-8")]
    assert not written, f"the version is written again in {written}"


def test_marking_a_constant_is_what_torch_compiler_does():
    """backends marks functions the way ``torch.compiler.assume_constant_result`` does, without importing
    dynamo: if torch changes how it marks them, this fails (and so do the fullgraph compile tests)."""

    def ours():
        return 0

    def torchs():
        return 0

    backends._constant_under_compile(ours)
    assert torch.compiler.assume_constant_result(torchs) is torchs
    assert vars(ours) == vars(torchs) == {"_dynamo_marked_constant": True}
