"""``metrics.jsonl``: one JSON object per logged step, appended and flushed as training goes.

Every line has ``step``, ``train_loss``, ``lr``, ``grad_norm``, ``grad_norm_max``, ``grad_spikes``,
``tokens``, ``tokens_per_s`` and ``elapsed_s``; lines of evaluation steps add ``val_loss`` (and for
language models ``val_loss_by_context``; for classifiers ``val_acc``) and, with diagnostics on,
``attn_out_norm`` and ``attn_sparsity`` (one value per layer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..runinfo import nan_for_null, strict_json

REQUIRED_KEYS = (
    "step",
    "train_loss",
    "lr",
    "grad_norm",
    "grad_norm_max",
    "grad_spikes",
    "tokens",
    "tokens_per_s",
    "elapsed_s",
)


class MetricsError(ValueError):
    """A line of metrics.jsonl that is not a row and cannot be a torn last line; the message names the line."""


def _row(line: bytes) -> dict | None:
    """The row ``line`` holds, or None if it holds none (not JSON, not UTF-8, not an object with an int step)."""
    try:
        row = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
        return None
    return {k: nan_for_null(v) for k, v in row.items()}  # every field is a number, or numbers


def read_metrics(path: str | Path, up_to_step: int | None = None) -> list[dict]:
    """The rows of a metrics.jsonl file (an empty list if it does not exist); with ``up_to_step``, the rows up
    to that step (rows are in step order: reading stops at the first row past it).

    Every row is one append, so an append cut short (power loss, a full disk) leaves a torn line at the end
    only: a last line that is not a row is dropped. Any other line that is not a row was damaged otherwise
    and raises MetricsError naming the file and the line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    rows = []
    for number, line in lines:
        row = _row(line)
        if row is None:
            if number == lines[-1][0]:
                break
            raise MetricsError(
                f"{path} line {number}: expected a metrics row (a JSON object with an int 'step'), got "
                f"{line[:40]!r}; only the last line can be torn by an interrupted write: repair or delete this one"
            )
        if up_to_step is not None and row["step"] > up_to_step:
            break
        rows.append(row)
    return rows


class MetricsWriter:
    """Appends rows to ``path``. ``resume_step`` keeps the rows up to that step (a resumed run continues
    after its checkpoint: rows logged after it before the interruption, and a line torn by it, are dropped);
    otherwise the file starts empty."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        kept = read_metrics(self.path, up_to_step=resume_step) if resume_step is not None else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(strict_json(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"a metrics row needs {missing}")
        with open(self.path, "a") as f:
            f.write(strict_json(row) + "\n")
