"""The driver that tree_ab.py and host_ab.py share: interleaved rounds of this tree against another.

Each round runs the script once per tree in a subprocess (its ``--worker PATH``, that tree first on sys.path),
baseline first, so clock drift and warm-up hit both; a worker writes ``{"sigattn": its package's file,
"rows": [...]}``. A row of the result is the median over rounds of each tree's value, and the ratio is this
tree's over the baseline's (below 1: this tree is faster). Run the scripts from a tree that holds this file
too (``git archive REV sigattn benchmarks | tar -x -C ROOT``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parents[1])


def interleave(
    script: str,
    baseline: str,
    rounds: int,
    worker_args: list[str],
    key: tuple[str, ...],
    value: str,
    unit: str,
    env: dict | None = None,
    this_env: dict | None = None,
) -> list[dict]:
    """Runs ``script`` in ``rounds`` rounds against the tree at ``baseline``; returns one row per ``key`` (the
    worker rows' fields that name a measurement) with ``baseline_<unit>`` and ``this_<unit>`` (medians of the
    workers' ``value``), ``ratio`` and every round's values (``baseline_runs``, ``this_runs``), in the order
    the workers measured them. ``env`` is set for both trees' workers, ``this_env`` for this tree's only (the
    baseline may then be this tree itself: the same code under another environment, e.g. another ptxas)."""
    trees = {"baseline": str(Path(baseline).resolve()), "this": HERE}
    times: dict[tuple, dict[str, list[float]]] = {}
    for r in range(rounds):
        for tree, root in trees.items():
            part = Path(f"/tmp/{Path(script).stem}_{tree}_{r}.json")
            command = [sys.executable, script, "--worker", str(part), *worker_args]
            extra = {**(env or {}), **((this_env or {}) if tree == "this" else {})}
            subprocess.run(command, env={**os.environ, **extra, "PYTHONPATH": root}, check=True, cwd=root)
            result = json.loads(part.read_text())
            assert result["sigattn"].startswith(root), result["sigattn"]
            for row in result["rows"]:
                times.setdefault(tuple(row[k] for k in key), {}).setdefault(tree, []).append(row[value])
    rows = []
    for names, runs in times.items():
        base, this = (statistics.median(runs[t]) for t in trees)
        row = {**dict(zip(key, names, strict=True)), f"baseline_{unit}": base, f"this_{unit}": this}
        rows.append({**row, "ratio": this / base, **{f"{t}_runs": runs[t] for t in trees}})
    return rows


def write_json(path: str | None, rows: list[dict]) -> None:
    """``{meta, rows}`` at ``path`` (nothing without one), with this tree's ``sigattn.runinfo.run_meta``."""
    if not path:
        return
    sys.path.insert(0, HERE)
    from sigattn.runinfo import run_meta

    Path(path).write_text(json.dumps({"meta": run_meta(" ".join(sys.argv)), "rows": rows}, indent=1))
