"""PNG plots of one or more runs' metrics (``metrics.jsonl`` rows), runs side by side.

loss.png         training and validation loss against step, every run on the same axes (each run its own
                 colour, line style and marker, so a curve drawn over another still shows both), and the
                 last validation loss at each evaluated context length (bars from 0, values written on them)
diagnostics.png  one column per run, shared y axes: gradient norm (largest per logged interval, spikes
                 marked), attention-output norm per layer, attention sparsity per layer
"""

from __future__ import annotations

from pathlib import Path

from ..plotting import pyplot, run_style, save_figure
from .diagnostics import SPARSITY_THRESHOLD


def _series(rows: list[dict], key: str) -> tuple[list[int], list]:
    picked = [r for r in rows if r.get(key) is not None]
    return [r["step"] for r in picked], [r[key] for r in picked]


def loss_figure(runs: dict[str, list[dict]]):
    """The figure of loss.png."""
    plt = pyplot()
    last_evals = {label: next((r for r in reversed(rows) if "val_loss" in r), None) for label, rows in runs.items()}
    contexts = sorted({int(n) for r in last_evals.values() if r for n in r.get("val_loss_by_context", {})})
    panels = 3 if contexts else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = axes[0]
    for i, (label, rows) in enumerate(runs.items()):
        style = run_style(label, i)
        line = {"color": style["color"], "linestyle": style["linestyle"]}
        axes[0].plot(*_series(rows, "train_loss"), label=label, lw=1.3, alpha=0.85, **line)
        axes[1].plot(
            *_series(rows, "val_loss"),
            marker=style["marker"],
            markersize=4,
            markerfacecolor="none",
            label=label,
            **line,
        )
    axes[0].set_title("training loss (mean per logged interval)")
    axes[1].set_title("validation loss")
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend()
    if contexts:
        width = 0.8 / len(runs)
        for i, (label, last) in enumerate(last_evals.items()):
            values = [last["val_loss_by_context"].get(str(n), float("nan")) if last else float("nan") for n in contexts]
            positions = [c + (i - (len(runs) - 1) / 2) * width for c in range(len(contexts))]
            bars = axes[2].bar(positions, values, width=width, label=label, color=run_style(label, i)["color"])
            axes[2].bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
        axes[2].set_xticks(range(len(contexts)), [str(n) for n in contexts])
        axes[2].set_xlabel("context length (tokens)")
        axes[2].set_ylabel("validation loss (nats/token)")
        axes[2].set_title("final validation loss by context")
        finite = [v for r in last_evals.values() if r for v in r["val_loss_by_context"].values() if v == v]
        # Bars from 0, so that their heights compare as the losses do; room above them for the values.
        axes[2].set_ylim(0, 1.15 * max(finite, default=1.0))
        if len(runs) > 1:
            axes[2].legend(loc="best")
    fig.tight_layout()
    return fig


def diagnostics_figure(runs: dict[str, list[dict]]):
    """The figure of diagnostics.png."""
    plt = pyplot()
    fig, axes = plt.subplots(3, len(runs), figsize=(5 * len(runs), 9), squeeze=False, sharey="row")
    for col, (label, rows) in enumerate(runs.items()):
        ax = axes[0][col]
        steps, norms = _series(rows, "grad_norm_max")
        ax.plot(steps, norms, color=run_style(label, col)["color"], label="gradient norm")
        spikes = [
            r
            for prev, r in zip([{"grad_spikes": 0}, *rows], rows, strict=False)
            if r["grad_spikes"] > prev["grad_spikes"]
        ]
        if spikes:
            ax.scatter(
                [r["step"] for r in spikes],
                [r["grad_norm_max"] for r in spikes],
                color="red",
                zorder=3,
                label=f"spikes ({rows[-1]['grad_spikes']})",
            )
            ax.legend()
        ax.set_title(f"{label}: gradient norm (max per interval)")
        ax.set_ylabel("global gradient norm (before clipping)")
        ax.set_yscale("log")
        panels = (
            ("attn_out_norm", "attention-output norm", "mean L2 norm per token"),
            ("attn_sparsity", "attention sparsity", f"share of weights < {SPARSITY_THRESHOLD:.0%} of row max"),
        )
        for row_index, (key, title, ylabel) in enumerate(panels, start=1):
            ax = axes[row_index][col]
            steps, values = _series(rows, key)
            for layer in range(len(values[0]) if values else 0):
                ax.plot(steps, [v[layer] for v in values], marker=".", label=f"layer {layer}")
            ax.set_title(f"{label}: {title} per layer")
            ax.set_ylabel(ylabel)
            if values and len(values[0]) > 1:
                ax.legend(fontsize="x-small", ncol=min(3, len(values[0])), loc="best")
        for ax in axes[:, col]:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_runs(runs: dict[str, list[dict]], out_dir: str | Path) -> list[Path]:
    """Writes loss.png and diagnostics.png for ``runs`` ({label: metrics rows}) into ``out_dir``."""
    out_dir = Path(out_dir)
    return [
        save_figure(loss_figure(runs), out_dir / "loss.png"),
        save_figure(diagnostics_figure(runs), out_dir / "diagnostics.png"),
    ]
