"""Checkpoints written atomically, and the random-number state a resumed run needs.

A checkpoint is written to a temporary file beside its final name, flushed to disk, then renamed over
the old one (``os.replace`` is atomic): a crash mid-write leaves the previous checkpoint intact.

A checkpoint is read with ``weights_only=True``: only tensors, numbers, strings and containers are
unpickled, so a file naming any other object (a pickle that would call ``os.system``, say) is refused
without running anything. Such a file, and one truncated or otherwise corrupt, raise ``CheckpointError``.
"""

from __future__ import annotations

import os
import pickle
import re
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


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded: ``path`` and what is wrong with it (``reason``)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


def load_checkpoint(path: str | Path) -> object:
    """A checkpoint's contents on the CPU (tensors, numbers, strings and containers only).

    Raises:
        CheckpointError: the file cannot be read, is truncated or corrupt, or names other objects.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise CheckpointError(path, f"cannot read it ({error.strerror or error})") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(path, describe_load_error(error)) from None


def describe_load_error(error: BaseException) -> str:
    """What an error of ``torch.load(weights_only=True)`` (many lines) says, in a few words."""
    refused = re.search(r"unsupported GLOBAL (\S+)", str(error))
    if refused:
        return (
            f"it holds an object other than tensors, numbers, strings and containers ({refused[1]}), "
            "which could run code when loaded; it was not loaded"
        )
    operand = re.search(r"Unsupported operand \d+", str(error))  # not a pickle at all
    detail = operand[0] if operand else str(error).split(". ")[0].split("\n")[0] or "it ends early"
    return f"the file is truncated or corrupt ({type(error).__name__}: {detail})"


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
