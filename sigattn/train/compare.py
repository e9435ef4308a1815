"""``sigattn compare``: train one preset with sigmoid and with softmax attention and report side by side.

OUT/sigmoid/, OUT/softmax/   each run's folder (see ``sigattn.train.trainer``)
OUT/summary.json             {"sigmoid": {"final_val_loss", "tokens_per_s", ...}, "softmax": {...}, ...}
OUT/report.md                the comparison as a table, with the plots
OUT/loss.png, OUT/diagnostics.png
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import sys
from pathlib import Path

import torch

from .. import __version__
from .metrics import read_metrics
from .plots import plot_runs
from .presets import build_config
from .trainer import CHECKPOINT, Log, TrainError, train

ATTNS = ("sigmoid", "softmax")
SUMMARY_KEYS = ("final_val_loss", "tokens_per_s", "val_loss_by_context", "train_seconds", "steps", "tokens",
                "grad_spikes")  # fmt: skip


def versions() -> dict[str, str | None]:
    """Versions of sigattn, Python, torch and triton (None if not installed)."""
    out = {"sigattn": __version__, "python": platform.python_version(), "torch": torch.__version__}
    try:
        out["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        out["triton"] = None
    return out


def compare(
    preset: str,
    out_dir: str | Path,
    overrides: list[str] = (),
    *,
    max_steps: int | None = None,
    resume: bool = False,
    log: Log | None = None,
) -> dict:
    """Trains ``preset`` with each attention into ``out_dir/<attn>``, then ``write_comparison``; returns the
    summary. ``resume`` continues runs that have a checkpoint (and starts the others)."""
    out_dir = Path(out_dir)
    configs = {attn: build_config(preset, overrides, attn=attn, max_steps=max_steps) for attn in ATTNS}
    for attn, config in configs.items():
        run_dir = out_dir / attn
        train(config, run_dir, resume=resume and (run_dir / CHECKPOINT).exists(), log=log)
    return write_comparison(out_dir, preset, list(overrides))


def write_comparison(out_dir: str | Path, preset: str, overrides: list[str] = ()) -> dict:
    """summary.json, report.md, loss.png and diagnostics.png in ``out_dir`` from the runs in
    ``out_dir/sigmoid`` and ``out_dir/softmax`` (their result.json, config.json and metrics.jsonl)."""
    out_dir = Path(out_dir)
    results, runs = {}, {}
    for attn in ATTNS:
        path = out_dir / attn / "result.json"
        if not path.is_file():
            raise TrainError(f"no {path}: train both attentions first (sigattn compare without --report-only)")
        results[attn] = json.loads(path.read_text())
        runs[attn] = read_metrics(out_dir / attn / "metrics.jsonl")
    config = json.loads((out_dir / "sigmoid" / "config.json").read_text())
    summary = summarize(preset, list(overrides), config, results)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        plots = [p.name for p in plot_runs(runs, out_dir)]
    except ImportError as error:  # no matplotlib
        print(f"sigattn compare: no plots: {error}", file=sys.stderr)
        plots = []
    (out_dir / "report.md").write_text(report(summary, plots))
    return summary


def summarize(preset: str, overrides: list[str], config: dict, results: dict[str, dict]) -> dict:
    """The summary.json object: per attention its SUMMARY_KEYS, the gaps, and where and how it ran."""
    sig, soft = results["sigmoid"], results["softmax"]
    summary = {attn: {k: r[k] for k in SUMMARY_KEYS} | {"out_dir": r["out_dir"]} for attn, r in results.items()}
    if sig["final_val_loss"] is not None and soft["final_val_loss"]:
        summary["val_loss_gap"] = (sig["final_val_loss"] - soft["final_val_loss"]) / soft["final_val_loss"]
    if sig["tokens_per_s"] and soft["tokens_per_s"]:
        summary["tokens_per_s_ratio"] = sig["tokens_per_s"] / soft["tokens_per_s"]
    devices = {r["device"] for r in results.values()}
    summary.update(
        preset=preset,
        overrides=overrides,
        config=config | {"model": {**config["model"], "attn": "(both)"}},
        device=" / ".join(sorted(devices)),
        versions=versions(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["sigattn", *sys.argv[1:]]) if Path(sys.argv[0]).name == "sigattn" else None,
    )
    return summary


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(summary: dict, plots: list[str]) -> str:
    """The comparison as markdown: a table of both runs, the gaps, and the plots."""
    sig, soft = summary["sigmoid"], summary["softmax"]
    contexts = sorted({int(n) for r in (sig, soft) for n in (r["val_loss_by_context"] or {})})
    lines = [
        f"# Sigmoid vs softmax attention: preset `{summary['preset']}`",
        "",
        f"{summary['date']} on {summary['device']}; "
        + ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v)
        + (f"; overrides: `{' '.join(summary['overrides'])}`" if summary["overrides"] else ""),
        "",
        "| | sigmoid | softmax |",
        "| --- | --- | --- |",
        f"| final validation loss | {_fmt(sig['final_val_loss'], '.4f')} | {_fmt(soft['final_val_loss'], '.4f')} |",
    ]
    for n in contexts:
        values = [(r["val_loss_by_context"] or {}).get(str(n)) for r in (sig, soft)]
        lines.append(f"| validation loss at context {n} | {_fmt(values[0], '.4f')} | {_fmt(values[1], '.4f')} |")
    lines += [
        f"| tokens/s (training steps) | {_fmt(sig['tokens_per_s'], ',.0f')} | {_fmt(soft['tokens_per_s'], ',.0f')} |",
        f"| training time (s) | {sig['train_seconds']:.1f} | {soft['train_seconds']:.1f} |",
        f"| steps | {sig['steps']} | {soft['steps']} |",
        f"| gradient-norm spikes | {sig['grad_spikes']} | {soft['grad_spikes']} |",
        "",
    ]
    if "val_loss_gap" in summary:
        gap = summary["val_loss_gap"]
        lines.append(f"Sigmoid's final validation loss is {abs(gap):.2%} {'above' if gap > 0 else 'below'} softmax's.")
    if "tokens_per_s_ratio" in summary:
        lines.append(f"Sigmoid trains at {summary['tokens_per_s_ratio']:.2f}x softmax's tokens/s.")
    lines.append("")
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
