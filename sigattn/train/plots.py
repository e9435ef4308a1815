"""PNG plots of one or more runs' metrics (``metrics.jsonl`` rows), runs side by side.

loss.png         training and validation loss against step, every run on the same axes, and the last
                 validation loss at each evaluated context length
diagnostics.png  one column per run, shared y axes: gradient norm (largest per logged interval, spikes
                 marked), attention-output norm per layer, attention sparsity per layer
"""

from __future__ import annotations

from pathlib import Path

COLORS = {"sigmoid": "tab:blue", "softmax": "tab:orange"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'sigattn[train]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], key: str) -> tuple[list[int], list]:
    picked = [r for r in rows if r.get(key) is not None]
    return [r["step"] for r in picked], [r[key] for r in picked]


def plot_loss(runs: dict[str, list[dict]], path: Path) -> Path:
    plt = _pyplot()
    last_evals = {label: next((r for r in reversed(rows) if "val_loss" in r), None) for label, rows in runs.items()}
    contexts = sorted({int(n) for r in last_evals.values() if r for n in r.get("val_loss_by_context", {})})
    panels = 3 if contexts else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = axes[0]
    for label, rows in runs.items():
        color = COLORS.get(label)
        axes[0].plot(*_series(rows, "train_loss"), label=label, color=color)
        axes[1].plot(*_series(rows, "val_loss"), marker="o", markersize=3, label=label, color=color)
    axes[0].set_title("training loss")
    axes[1].set_title("validation loss")
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
    if contexts:
        width = 0.8 / len(runs)
        for i, (label, last) in enumerate(last_evals.items()):
            values = [last["val_loss_by_context"].get(str(n), float("nan")) if last else float("nan") for n in contexts]
            positions = [c + (i - (len(runs) - 1) / 2) * width for c in range(len(contexts))]
            axes[2].bar(positions, values, width=width, label=label, color=COLORS.get(label))
        axes[2].set_xticks(range(len(contexts)), [str(n) for n in contexts])
        axes[2].set_xlabel("context length")
        axes[2].set_title("final validation loss by context")
        axes[2].set_ylim(
            bottom=min(v for r in last_evals.values() if r for v in r["val_loss_by_context"].values()) * 0.9
        )
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_diagnostics(runs: dict[str, list[dict]], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(3, len(runs), figsize=(5 * len(runs), 9), squeeze=False, sharey="row")
    for col, (label, rows) in enumerate(runs.items()):
        ax = axes[0][col]
        steps, norms = _series(rows, "grad_norm_max")
        ax.plot(steps, norms, color=COLORS.get(label))
        spikes = [
            r
            for prev, r in zip([{"grad_spikes": 0}, *rows], rows, strict=False)
            if r["grad_spikes"] > prev["grad_spikes"]
        ]
        if spikes:
            ax.scatter([r["step"] for r in spikes], [r["grad_norm_max"] for r in spikes], color="red", zorder=3,
                       label=f"spikes ({rows[-1]['grad_spikes']})")  # fmt: skip
            ax.legend()
        ax.set_title(f"{label}: gradient norm (max per interval)")
        ax.set_yscale("log")
        for row_index, (key, title) in enumerate(
            (("attn_out_norm", "attention-output norm"), ("attn_sparsity", "attention sparsity")), start=1
        ):
            ax = axes[row_index][col]
            steps, values = _series(rows, key)
            for layer in range(len(values[0]) if values else 0):
                ax.plot(steps, [v[layer] for v in values], marker=".", label=f"layer {layer}")
            ax.set_title(f"{label}: {title} per layer")
            if values:
                ax.legend(fontsize="small")
        for ax in axes[:, col]:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(runs: dict[str, list[dict]], out_dir: str | Path) -> list[Path]:
    """Writes loss.png and diagnostics.png for ``runs`` ({label: metrics rows}) into ``out_dir``."""
    out_dir = Path(out_dir)
    return [plot_loss(runs, out_dir / "loss.png"), plot_diagnostics(runs, out_dir / "diagnostics.png")]
