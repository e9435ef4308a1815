"""Checkpoints written atomically, and the random-number state a resumed run needs.

A checkpoint is written to a temporary file beside its final name, flushed to disk, then renamed over
the old one (``os.replace`` is atomic): a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomic(obj: dict, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` by write-then-rename; no partial file is ever left at ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents on the CPU (tensors, numbers, strings and containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """The CPU and (if present) CUDA generators' states."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
