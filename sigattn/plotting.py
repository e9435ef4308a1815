"""What every plot the project draws shares: matplotlib (an optional dependency, imported when a plot is
drawn, with an error that says how to install it), one way to save a figure, the attentions' look and
plain-number ticks on log axes.

It sits at the bottom beside ``runinfo.py``, importing only the standard library (and matplotlib, lazily),
so that the tools which draw figures use it without importing each other: ``train`` (loss.png,
diagnostics.png), ``experiments`` (their *.png) and the lab's ``bench`` (``--plot``).
"""

from __future__ import annotations

import sys
from pathlib import Path

DPI = 110

# Each attention's look: colour, line style and marker differ, so that curves which overlap stay
# distinguishable. Other curves take OTHER_STYLES in turn (``run_style``).
STYLES = {
    "sigmoid": {"color": "tab:blue", "linestyle": "-", "marker": "o"},
    "softmax": {"color": "tab:orange", "linestyle": "--", "marker": "s"},
}
OTHER_STYLES = [
    {"color": "tab:green", "linestyle": "-.", "marker": "^"},
    {"color": "tab:red", "linestyle": ":", "marker": "D"},
    {"color": "tab:purple", "linestyle": "-", "marker": "v"},
]


def run_style(label: str, index: int) -> dict:
    """The colour, line style and marker of the curve ``label`` (the ``index``-th of a plot)."""
    return STYLES.get(label, OTHER_STYLES[index % len(OTHER_STYLES)])


def _matplotlib(extra: str):
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"plots need matplotlib: pip install 'sigattn[{extra}]'") from None
    return matplotlib


def pyplot(extra: str = "train"):
    """matplotlib.pyplot with the non-interactive Agg backend; without matplotlib an ImportError naming the
    ``sigattn[extra]`` that installs it."""
    _matplotlib(extra).use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(*, extra: str = "train", **kwargs):
    """A ``matplotlib.figure.Figure(**kwargs)`` outside pyplot: no backend chosen, no global state, nothing
    to close (what a library function that may run in someone's notebook should draw on)."""
    _matplotlib(extra)
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure(fig, path: Path) -> Path:
    """Writes ``fig`` to ``path`` (the format from its suffix: PNG) at ``DPI``, creating its folder, and
    closes it if pyplot holds it; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt = sys.modules.get("matplotlib.pyplot")  # a figure pyplot made means pyplot is imported
    if plt is not None:
        plt.close(fig)
    return path


def label_log_ticks(axis, values) -> None:
    """Ticks of a log-scaled ``axis`` (``ax.xaxis``) at ``values`` only, labelled as plain numbers: the
    default minor-tick labels (2x10^2, 3x10^2, ...) collide when the axis spans less than a decade or two."""
    import matplotlib.ticker as ticker

    axis.set_major_locator(ticker.FixedLocator(list(values)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


__all__ = ["DPI", "OTHER_STYLES", "STYLES", "figure", "label_log_ticks", "pyplot", "run_style", "save_figure"]
