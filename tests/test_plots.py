"""Every PNG the commands write, inspected as matplotlib figures just before they are saved, as a reader
would look at them: each axes with data has axis labels; an axes with more than one series has a legend
whose entries look different (colour or marker, or line style for lines without markers: a marker drawn
on a short legend line hides its dash pattern); bars start at 0; no two tick labels overlap; and the fitted
lines behind a verdict are drawn. The commands are `sigattn compare` and every `sigattn experiment`, run
in-process at their smallest settings, with Figure.savefig wrapped to check each figure."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from sigattn import cli  # noqa: E402
from sigattn.experiments import EXPERIMENTS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

WORDS = ["the", "king", "queen", "doth", "speak", "of", "love", "and", "war", "upon", "thy", "noble", "heart", "my"]
# Lines labelled "... fit ..." that each figure must draw: the fits its verdict (or reader) relies on.
FITTED_LINES = {
    "moe_rates.png": 4,  # a power law per attention and regime
    "regularity.png": 4,  # power law and exponential per attention
    "ksum.png": 1,  # the gap's trend
    "bias_ablation_init_norms.png": 3,  # a power law per variant
}


# ------------------------------------------------------------------------------------------- the checks


def _is_data_line(ax, line: Line2D) -> bool:
    """A line of data, not a reference drawn across the axes (axhline/axvline, errorbar caps and bars)."""
    return line.get_transform() == ax.transData and len(line.get_xdata()) > 0 and line.get_visible()


def data_series(ax) -> list:
    """The series an axes shows: its data lines, scatters, bar groups and error-bar groups."""
    in_containers = set()
    series = []
    for container in ax.containers:
        if isinstance(container, BarContainer | ErrorbarContainer):
            series.append(container)
            for child in container.get_children():
                in_containers.add(id(child))
    series += [line for line in ax.get_lines() if _is_data_line(ax, line) and id(line) not in in_containers]
    series += [c for c in ax.collections if isinstance(c, PathCollection) and id(c) not in in_containers]
    return series


def _shares_label(ax, which: str) -> bool:
    """Whether an axes that shares this one's x (or y) axis has the label."""
    group = ax.get_shared_x_axes() if which == "x" else ax.get_shared_y_axes()
    get = "get_xlabel" if which == "x" else "get_ylabel"
    return any(getattr(other, get)() for other in group.get_siblings(ax))


def _look(handle) -> tuple:
    """What tells a legend entry apart: colour, marker and (for lines without markers) line style."""
    if isinstance(handle, Line2D):
        marker = handle.get_marker()
        marker = None if marker in ("None", "", " ", None) else marker
        color = matplotlib.colors.to_hex(handle.get_color())
        return (color, marker) if marker else (color, None, handle.get_linestyle())
    colors = []  # patches and collections: the first colour they fill or draw with
    for getter in ("get_facecolor", "get_edgecolor", "get_color"):
        value = getattr(handle, getter, lambda: None)()
        if value is not None and len(value):
            colors.append(value[0] if getattr(value, "ndim", 1) == 2 else value)
    return (matplotlib.colors.to_hex(colors[0]) if colors else None, type(handle).__name__)


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 - 0.5 and b.x0 < a.x1 - 0.5 and a.y0 < b.y1 - 0.5 and b.y0 < a.y1 - 0.5


def figure_problems(fig: Figure) -> list[str]:
    """Everything a reader would trip over in ``fig``; an empty list for a readable figure."""
    problems = []
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for index, ax in enumerate(fig.axes):
        series = data_series(ax)
        if not series:
            continue
        where = f"axes {index} ({ax.get_title()!r})"
        if not ax.get_xlabel() and not _shares_label(ax, "x"):
            problems.append(f"{where}: no x label")
        if not ax.get_ylabel() and not _shares_label(ax, "y"):
            problems.append(f"{where}: no y label")
        legend = ax.get_legend()
        if len(series) > 1 and legend is None and not fig.legends:
            problems.append(f"{where}: {len(series)} series and no legend")
        if legend is not None:
            entries = zip(legend.get_texts(), legend.legend_handles, strict=True)
            looks = [(text.get_text(), _look(handle)) for text, handle in entries]
            for (name_a, look_a), (name_b, look_b) in itertools.combinations(looks, 2):
                if look_a == look_b:
                    problems.append(f"{where}: legend entries {name_a!r} and {name_b!r} look the same ({look_a})")
        if any(isinstance(c, BarContainer) for c in ax.containers) and ax.get_ylim()[0] > 0:
            problems.append(f"{where}: bars start at {ax.get_ylim()[0]:.3g}, not 0 (it exaggerates the gaps)")
        for axis in (ax.xaxis, ax.yaxis):
            labels = [
                t
                for t in axis.get_ticklabels(minor=False) + axis.get_ticklabels(minor=True)
                if t.get_visible() and t.get_text()
            ]
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
            for (text_a, a), (text_b, b) in itertools.combinations(boxes, 2):
                if _overlaps(a, b):
                    problems.append(f"{where}: tick labels {text_a!r} and {text_b!r} overlap")
    return problems


def fitted_lines(fig: Figure) -> int:
    return sum(1 for ax in fig.axes for line in ax.get_lines() if "fit" in line.get_label())


@pytest.fixture
def inspected(monkeypatch) -> dict[str, dict]:
    """Wraps Figure.savefig: each figure saved is checked first; {file name: {problems, fits, path}}."""
    seen: dict[str, dict] = {}
    save = Figure.savefig

    def checked_save(fig, fname, *args, **kwargs):
        path = Path(fname)
        seen[path.name] = {"problems": figure_problems(fig), "fits": fitted_lines(fig), "path": path}
        return save(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", checked_save)
    return seen


def assert_readable(seen: dict[str, dict], written: list[Path]) -> None:
    assert written, "the command wrote no PNG"
    assert {p.name for p in written} <= set(seen), f"PNGs written without savefig: {written}"
    for name, entry in seen.items():
        assert entry["problems"] == [], f"{name}: {entry['problems']}"
        if name in FITTED_LINES:
            assert entry["fits"] >= FITTED_LINES[name], f"{name}: {entry['fits']} fitted lines drawn"


# ------------------------------------------------------------------------------------------ the commands


def test_compare_plots_are_readable(tmp_path, inspected, capsys):
    rng = random.Random(0)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(600)))
    out = tmp_path / "cmp"
    settings = (
        "model.n_layer=2 model.d_model=32 model.n_head=2 model.block_size=16 train.batch_size=8 train.log_every=2 "
        "train.eval_every=4 train.eval_windows=4 train.eval_context_lengths=8,32 optim.warmup_steps=2 "
        "train.progress=false"
    )
    argv = ["compare", "--preset", "tiny", "--out", str(out), "--max-steps", "8", "data.dataset=text"]
    argv += [f"data.path={text}", *settings.split()]
    assert cli.main(argv) == 0, capsys.readouterr().err
    written = sorted(out.rglob("*.png"))
    # the comparison's two plots and each run's own (one series each)
    assert {str(p.relative_to(out)) for p in written} == {
        "loss.png",
        "diagnostics.png",
        "sigmoid/loss.png",
        "sigmoid/diagnostics.png",
        "softmax/loss.png",
        "softmax/diagnostics.png",
    }
    assert_readable(inspected, written)


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_plots_are_readable(tmp_path, monkeypatch, inspected, capsys, name):
    """`sigattn experiment NAME --quick --json` with the quick setting replaced by the test one."""
    module = EXPERIMENTS[name].run.__module__
    settings = __import__(module, fromlist=["SETTINGS"]).SETTINGS
    monkeypatch.setitem(settings, "quick", settings["test"])
    assert cli.main(["experiment", name, "--quick", "--json", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # --json: the result alone on stdout, progress on stderr
    assert result == json.loads((tmp_path / "result.json").read_text())
    assert f"{name}: " in err
    written = sorted(tmp_path.glob("*.png"))
    assert sorted(result["figures"]) == [p.name for p in written]
    assert_readable(inspected, written)


# ------------------------------------------------------------------------------------ the checks' checks


def test_the_checks_catch_what_the_issue_reported():
    """The defects of issue 28, drawn on purpose: each is reported."""
    plt = matplotlib.pyplot
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    for pos, style in (("rope", "-"), ("alibi", "--")):  # the old length-extrapolation legend
        axes[0].plot([1, 2, 4], [1, 2, 3], "o" + style, color="tab:blue", label=f"sigmoid + {pos}")
    axes[0].set_xlabel("length")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].bar([0, 1], [1.4, 1.5])  # the old loss bar chart: y from 0.9 x min, no y label
    axes[1].set_ylim(bottom=1.26)
    axes[1].set_xlabel("context")
    axes[2].plot([200, 800, 3200], [1, 2, 3])  # the old MoE axis: minor tick labels on a short log axis
    axes[2].plot([200, 800, 3200], [3, 2, 1])  # two series, no legend
    axes[2].set_xscale("log")
    axes[2].set_xlim(150, 4000)
    axes[2].xaxis.set_minor_formatter(matplotlib.ticker.LogFormatterSciNotation(labelOnlyBase=False))
    axes[2].set_xlabel("n")
    axes[2].set_ylabel("loss")
    problems = " | ".join(figure_problems(fig))
    plt.close(fig)
    assert "legend entries 'sigmoid + rope' and 'sigmoid + alibi' look the same" in problems
    assert "axes 1 ('')" in problems and "no y label" in problems and "bars start at 1.26, not 0" in problems
    assert "axes 2 ('')" in problems and "2 series and no legend" in problems and "overlap" in problems
