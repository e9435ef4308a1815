"""The kernels under every supported Triton release besides the one the suite runs on (the README's matrix).

For each release in ``OTHER_RELEASES``, a virtual environment that reuses this Python's packages (torch,
numpy, sigattn itself) with only that Triton installed over them, cached under ``$SIGATTN_CACHE_DIR``
(default ``~/.cache/sigattn``) ``/triton-matrix/`` so that a rerun downloads nothing. In it, this suite's own
tests: every Gluon kernel compiled for sm_90a within the register and spill limits of ``test_hopper.py`` (and
its dispatch rules), the launcher's assumptions about Triton (``test_host.py``), every Triton kernel compiled
for sm_80, sm_90 and sm_100 (``test_triton_targets.py``), and a few kernels run in Triton's interpreter
(``INTERPRETED``). Two releases run at once; 2.5-4.5 minutes per release alone on a 2-core CPU, the first time
with its download.
"""

import concurrent.futures
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import triton

from sigattn.ops.sigmoid_attn import compat

ROOT = Path(__file__).resolve().parent.parent
# The releases the PyTorch versions of pyproject.toml's bounds pin (2.11: 3.6, the suite's own; 2.12.0: 3.7.0;
# 2.12.1 and 2.13: 3.7.1) through the newest on PyPI (3.8.0 for torch 2.14, 3.9.0 for 2.15): compat.SUPPORTED.
OTHER_RELEASES = ["3.7.0", "3.7.1", "3.8.0", "3.9.0"]
TESTS = ["tests/test_hopper.py", "tests/test_host.py", "tests/test_triton_targets.py"]
INTERPRETED = [
    "tests/test_flash.py::test_public_api_runs_on_triton_backend",
    "tests/test_flash.py::test_public_varlen_runs_on_triton_backend",
    "tests/test_flash.py::test_kvcache_split_sum_into_a_strided_out",
    "tests/test_flash.py::test_backward_is_deterministic",
]


def test_the_releases_are_the_supported_range():
    """The matrix covers compat.SUPPORTED from end to end, with the suite's own release at its start."""
    releases = [tuple(int(p) for p in v.split(".")[:3]) for v in (triton.__version__, *OTHER_RELEASES)]
    assert releases[0][:2] == compat.SUPPORTED[0] and releases[-1][:2] == compat.SUPPORTED[1]
    assert releases == sorted(set(releases))


def environment(release: str) -> Path:
    """The cached virtual environment with Triton ``release``, built (or repaired) if needed."""
    cache = Path(os.environ.get("SIGATTN_CACHE_DIR", Path.home() / ".cache" / "sigattn"))
    path = cache / "triton-matrix" / f"triton-{release}"
    python = path / "bin" / "python"
    check = [str(python), "-c", f"import triton; assert triton.__version__ == {release!r}"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return path
    venv.EnvBuilder(system_site_packages=True, clear=True, with_pip=False).create(path)
    # This Python's pip installs into the environment: no pip of its own to bootstrap (ensurepip: 10 s).
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", f"triton=={release}"]
    result = subprocess.run(install, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    subprocess.run(check, check=True)
    return path


# Releases whose suites run at once: the compilers are single-threaded for most of a run, so two share CI's
# 2 cores (one after another, the four took 771 s of a 1440 s suite on the development machine).
AT_ONCE = 2


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess]:
    """Each release's run of the tests, AT_ONCE releases at a time (environments built one by one first)."""
    pythons = {release: environment(release) / "bin" / "python" for release in OTHER_RELEASES}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}

    def run(release: str) -> subprocess.CompletedProcess:
        command = [str(pythons[release]), "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, *INTERPRETED]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)

    with concurrent.futures.ThreadPoolExecutor(AT_ONCE) as pool:
        return dict(zip(OTHER_RELEASES, pool.map(run, OTHER_RELEASES), strict=True))


@pytest.mark.parametrize("release", OTHER_RELEASES)
def test_kernels_under_triton_release(runs, release):
    result = runs[release]
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary, summary
