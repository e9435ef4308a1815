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

REQUIRED_KEYS = ("step", "train_loss", "lr", "grad_norm", "grad_norm_max", "grad_spikes", "tokens",
                 "tokens_per_s", "elapsed_s")  # fmt: skip


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl file (an empty list if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends rows to ``path``. ``resume_step`` keeps the rows up to that step (a resumed run continues
    after its checkpoint; rows logged after it, before the interruption, are dropped); otherwise the file
    starts empty."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step is not None else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"a metrics row needs {missing}")
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
