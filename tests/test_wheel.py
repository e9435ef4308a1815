"""The package as a user gets it: build the sdist, build the wheel from the sdist (as ``python -m build``
does, so a file missing from the sdist fails here), install the wheel, not editable, into a fresh virtual
environment, and run ``sigattn --version``, ``sigattn info``, ``sigattn example`` and a smoke test there,
from a folder outside the source tree.

Offline and quick (about 30 s on a 2-core CPU): no build isolation (the ``test`` extra installs ``build``
and setuptools >= 77), and the environment sees this interpreter's packages (``--system-site-packages``)
for torch, numpy and triton instead of downloading them; the wheel's own sigattn shadows the editable
one, which the smoke test checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import sigattn

REPO = Path(__file__).resolve().parents[1]

SMOKE = """
import importlib.metadata, math, sys
from importlib.resources import files
from pathlib import Path

import torch
import sigattn
from sigattn.ops.sigmoid_attn.reference import sigmoid_attn_reference

package = Path(sigattn.__file__).parent
assert package.is_relative_to(Path(sys.prefix)), f"imported {package}, not the wheel in {sys.prefix}"
assert sigattn.__version__ == importlib.metadata.version("sigattn"), sigattn.__version__
assert (package / "py.typed").is_file()
assert files("sigattn.train").joinpath("presets", "tiny.toml").is_file()
license = [f for f in importlib.metadata.files("sigattn") if f.name == "LICENSE"]
assert license and "Apache License" in license[0].read_text(), license

torch.manual_seed(0)
q, k, v = (torch.randn(1, 33, 4, 32, dtype=torch.float64) for _ in range(3))
out = sigattn.sigmoid_attn_func(q, k, v, causal=True, bias=-math.log(33))
torch.testing.assert_close(out, sigmoid_attn_reference(q, k, v, causal=True, bias=-math.log(33)))
print("smoke ok", package)
"""


def run(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SIGATTN_BACKEND", "TRITON_INTERPRET")}
    # What the build reads (the rest of the checkout, results and benchmarks, is not part of the package).
    source = tmp_path / "source"
    shutil.copytree(REPO / "sigattn", source / "sigattn", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)

    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source], tmp_path, env)
    version = sigattn.__version__
    sdist, wheel = dist / f"sigattn-{version}.tar.gz", dist / f"sigattn-{version}-py3-none-any.whl"
    with tarfile.open(sdist) as archive:
        names = {Path(n).relative_to(f"sigattn-{version}").as_posix() for n in archive.getnames()}
    assert {"LICENSE", "pyproject.toml", "README.md", "sigattn/py.typed", "sigattn/__main__.py"} <= names
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"sigattn-{version}.dist-info/entry_points.txt").decode()
    license = f"sigattn-{version}.dist-info/licenses/LICENSE"
    assert {"sigattn/py.typed", "sigattn/__main__.py", "sigattn/train/presets/tiny.toml", license} <= names
    assert "sigattn = sigattn.__main__:main" in entry_points

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path, env)
    python, command = venv / "bin" / "python", venv / "bin" / "sigattn"
    # The outer pip installs into the environment (--python); --ignore-installed: the editable sigattn that
    # the environment sees stays, and is shadowed.
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--ignore-installed"]
    run([*pip, wheel], tmp_path, env)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert run([command, "--version"], outside, env).stdout == f"sigattn {version}\n"
    info = run([command, "info"], outside, env).stdout
    assert f"sigattn           {version}" in info and "sigmoid_attn_func" in info
    example = run([command, "example"], outside, env).stdout
    assert example.rstrip().endswith("\nok"), example
    smoke = run([python, "-c", SMOKE], outside, env).stdout
    assert smoke.startswith("smoke ok " + str(venv)), smoke
