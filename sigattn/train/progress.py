"""What a person watching a run sees on stderr while it trains.

On a terminal: a tqdm bar with the loss and tokens/s; every other line (evaluations, a stop) is written
through the bar's own writer, so a line never lands in the middle of the bar. When stderr is not a terminal
(a log file, a pipe, CI), or tqdm is not installed: one plain line per logged step instead,

    [sigmoid] step 120/600 (20%): loss 2.345, 12,345 tok/s, 1m23s left

with the time left estimated from the steps this process has run (evaluations included).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable

Log = Callable[[str], None]


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def postfix(row: dict) -> str:
    """A metrics row in a few words: ``loss 2.345, val 2.401, 12,345 tok/s``."""
    parts = [f"loss {row['train_loss']:.3f}"]
    if "val_loss" in row:
        parts.append(f"val {row['val_loss']:.3f}")
    if row.get("tokens_per_s"):
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    return ", ".join(parts)


class Progress:
    """Progress reports of one run from step ``initial`` to ``total``: a bar on a terminal, else plain lines
    through ``log``; ``enabled=False`` reports nothing (evaluation lines still go through ``write``)."""

    def __init__(self, label: str, total: int, initial: int, enabled: bool, log: Log):
        self.label, self.total, self.log = label, total, log
        self.bar = _tqdm_bar(label, total, initial) if enabled else None
        self.plain = enabled and self.bar is None
        self.start_step, self.start_time = initial, time.perf_counter()

    def update(self) -> None:
        """One more step done."""
        if self.bar is not None:
            self.bar.update(1)

    def logged(self, row: dict) -> None:
        """A metrics row was logged at ``row["step"]``."""
        if self.bar is not None:
            self.bar.set_postfix_str(postfix(row))
        elif self.plain:
            step = row["step"]
            done = step - self.start_step
            left = ""
            if done > 0 and step < self.total:
                per_step = (time.perf_counter() - self.start_time) / done
                left = f", {format_duration(per_step * (self.total - step))} left"
            percent = 100 * step // self.total
            self.log(f"[{self.label}] step {step}/{self.total} ({percent}%): {postfix(row)}{left}")

    def write(self, line: str) -> None:
        """``log(line)``, with the bar cleared first and drawn again after."""
        with self.bar.external_write_mode(file=sys.stderr) if self.bar is not None else contextlib.nullcontext():
            self.log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tqdm_bar(label: str, total: int, initial: int):
    """A tqdm bar on stderr, or None when stderr is not a terminal or tqdm is not installed."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=label, unit="step", dynamic_ncols=True, leave=False, file=sys.stderr)
