"""Where and with what a run ran: versions, device, date, command and git commit, for every record the
project writes (result JSONs of the grids and benchmarks, ``sigattn info``, training and experiment
summaries).

It sits at the bottom beside ``validation.py``, importing only the standard library, torch and the package
version, so that every layer may use it: the lab (``sigattn.testing``, ``sigattn.bench``) and the tools
beside it (``train``, ``experiments``) alike, none of them importing another for it.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
import subprocess
from pathlib import Path

import torch

from . import __version__


def module_version(name: str) -> str | None:
    """``__version__`` of the module ``name``, or None if it does not import."""
    try:
        return importlib.import_module(name).__version__
    except ImportError:
        return None


def versions(*extra: str) -> dict[str, str | None]:
    """The versions of sigattn, Python, torch and triton, then of the modules ``extra`` names (None: not
    installed)."""
    return {
        "sigattn": __version__,
        "python": platform.python_version(),
        **{name: module_version(name) for name in ("torch", "triton", *extra)},
    }


def utc_date() -> str:
    """Now, in UTC, to the second (ISO 8601: ``2026-12-03T14:05:09+00:00``)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_name() -> str:
    """The processor's name, or the machine's architecture where the platform gives none."""
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from ("-dirty" if tracked files changed), or None outside one."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def device_label(device: torch.device | None = None) -> str:
    """The GPU's name (``device``'s, else the current one's) where CUDA runs, else "cpu", with
    "(TRITON_INTERPRET=1)" when the Triton kernels run in the interpreter."""
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        return torch.cuda.get_device_name(device)
    return "cpu" + (" (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else "")


def run_meta(command: str, device: torch.device | None = None) -> dict:
    """The ``meta`` of a result JSON: ``{"device", "torch", "triton", "python", "cuda", "date", "command",
    "git_commit"}``. ``cuda`` is torch's CUDA version (None for a CPU build), ``git_commit`` None outside a
    git checkout."""
    return {
        "device": device_label(device),
        "torch": torch.__version__,
        "triton": module_version("triton"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "date": utc_date(),
        "command": command,
        "git_commit": git_commit(),
    }


def strict_json(value, *, default=None, **options) -> str:
    """``json.dumps(value, **options)`` as strict JSON: a non-finite float (a diverged run's nan loss, an inf
    norm) is written as null. Python's default writes bare NaN and Infinity, which strict readers (jq,
    JavaScript, most other tools) reject. ``default`` turns what JSON has no type for into what it has, as
    json.dumps's does; the project's readers turn null in a numeric field back into nan (``nan_for_null``)."""

    def finite(value):
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [finite(v) for v in value]
        if default is not None and not isinstance(value, str | int | bool | None):
            return finite(default(value))  # converted first, so that its floats are checked too
        return value

    return json.dumps(finite(value), allow_nan=False, **options)


def nan_for_null(value):
    """A numeric field as ``strict_json`` wrote it, read back: null (a non-finite float) becomes nan, in a number
    or in the lists and dicts of numbers it holds. For fields that are numbers when written, never None."""
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: nan_for_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_for_null(v) for v in value]
    return value


def write_json(path: str | Path, meta: dict, rows: list[dict], **sections) -> None:
    """Writes ``{"meta": meta, "rows": rows, **sections}`` to ``path`` (its folder made if missing), as strict
    JSON (``strict_json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(strict_json({"meta": meta, "rows": rows, **sections}, indent=1) + "\n")
