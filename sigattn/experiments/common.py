"""What every experiment shares: its sizes, the verdict and outputs it writes, the slope fit and the plots.

An experiment is a function ``run(size, out_dir) -> Outcome`` registered under its name (``sigattn.
experiments.EXPERIMENTS``). ``run_experiment`` times it and writes into ``out_dir``:

    result.json   the measured numbers (experiment-specific keys at the top level), the verdict, the
                  settings and where and how it ran (versions, CPU, date, command, seconds)
    report.md     the claim, the setup, the numbers and the verdict, all generated from result.json's values
    *.png         the plots

Sizes: ``full`` (the documented setting), ``quick`` (a few minutes on a 2-core CPU: ``--quick``) and
``test`` (seconds: the test suite's).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import plotting
from ..runinfo import cpu_name, utc_date, versions

SIZES = ("test", "quick", "full")
# The experiments' models are tiny: one intra-op thread avoids oversubscribing a shared CPU (a k-sum training
# step on the 2-core development machine under load: 18 ms with 1 thread, 276 ms with 2).
CPU_THREADS = 1


@dataclass
class Verdict:
    """Whether the measured numbers support the claim, decided by ``rule`` (stated in the report).

    ``supports`` is None when the rule cannot decide (e.g. too few points for a confidence interval)."""

    supports: bool | None
    rule: str
    summary: str

    @property
    def word(self) -> str:
        return {True: "supports", False: "does not support", None: "inconclusive about"}[self.supports]


@dataclass
class Outcome:
    """What an experiment hands back: its numbers, verdict, report sections and plot files."""

    results: dict  # experiment-specific keys, written at the top level of result.json
    verdict: Verdict
    settings: dict
    setup: str  # markdown: what was run, stated exactly
    findings: str  # markdown: the measured numbers (tables), generated from ``results``
    figures: list[str] = field(default_factory=list)  # PNG file names inside the output folder


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    source: str  # the paper whose claim is tested
    claim: str
    run: Callable[..., Outcome]  # run(size, out_dir, log=print)
    full_runtime: str  # the documented runtime of the full setting


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(map(repr, SIZES))}; got {size!r}")
    return size


@contextlib.contextmanager
def cpu_threads(count: int):
    """Runs the block with ``count`` intra-op CPU threads, then restores the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def environment(command: str | None = None) -> dict:
    """Where and how the experiment ran."""
    found = versions()
    return {
        **{name: found[name] for name in ("sigattn", "torch", "python")},
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "date": utc_date(),
        "command": command,
    }


def run_experiment(
    experiment: Experiment, size: str, out_dir: str | Path, *, log=print, command: str | None = None
) -> dict:
    """Runs ``experiment`` at ``size`` and writes result.json, report.md and its plots into ``out_dir``;
    returns result.json's contents. ``command`` (the command line, if any) is recorded."""
    check_size(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with cpu_threads(CPU_THREADS):
        start = time.perf_counter()
        outcome = experiment.run(size, out, log=log)
        seconds = time.perf_counter() - start
        meta = {**environment(command), "size": size, "seconds": round(seconds, 1)}
    result = {
        "experiment": experiment.name,
        "source": experiment.source,
        "claim": experiment.claim,
        "verdict": {
            "supports": outcome.verdict.supports,
            "word": outcome.verdict.word,
            "rule": outcome.verdict.rule,
            "summary": outcome.verdict.summary,
        },
        **outcome.results,
        "settings": outcome.settings,
        "figures": outcome.figures,
        "meta": meta,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    (out / "report.md").write_text(report_markdown(experiment, outcome, meta))
    log(f"{experiment.name}: {outcome.verdict.word} — {outcome.verdict.summary} ({seconds:.0f} s; {out})")
    return result


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def report_markdown(experiment: Experiment, outcome: Outcome, meta: dict) -> str:
    verdict = outcome.verdict
    size_note = ""
    if meta["size"] != "full":
        size_note = (
            f"\n> Size `{meta['size']}`: a reduced setting for a fast check, not the documented full run "
            f"({experiment.full_runtime}). Its numbers are noisier and may not match the full run's.\n"
        )
    lines = [
        f"# {experiment.title} (`{experiment.name}`)",
        size_note,
        f"**Claim tested** ({experiment.source}): {experiment.claim}",
        "",
        f"**Verdict: {verdict.word} the claim.** {verdict.summary}",
        "",
        f"*Rule:* {verdict.rule}",
        "",
        "## Setup",
        "",
        outcome.setup.strip(),
        "",
        "## Measured",
        "",
        outcome.findings.strip(),
        "",
        *(f"![{name}]({name})\n" for name in outcome.figures),
        "## Run",
        "",
        f"Size `{meta['size']}`, {meta['seconds']:.0f} s on {meta['cpu']} ({meta['threads']} intra-op thread(s)), "
        f"torch {meta['torch']}, sigattn {meta['sigattn']}, {meta['date']}."
        + (f" Command: `{meta['command']}`." if meta["command"] else ""),
        "",
    ]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ statistics


@functools.lru_cache(maxsize=256)
def student_t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (0 < p < 1).

    Bisection on the CDF, which is 1/2 plus the integral of the density from 0 (Simpson's rule, 2000
    intervals: |error| < 1e-7 for df >= 1 and |t| < 100); the normal quantile for df > 1e6."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    if df > 1e6:
        return statistics.NormalDist().inv_cdf(p)
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    def cdf(t: float) -> float:
        steps = 2000
        h = t / steps
        total = density(0.0) + density(t)
        total += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
        return 0.5 + total * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"the {p}-quantile of t({df}) is beyond 1e6")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class SlopeFit:
    """A least-squares line y = intercept + slope * x with the slope's 95% confidence interval
    (t-distribution with len(x) - 2 degrees of freedom)."""

    slope: float
    intercept: float
    ci95: tuple[float, float]
    stderr: float
    points: int

    def to_dict(self) -> dict:
        return {
            "slope": self.slope,
            "ci95": list(self.ci95),
            "stderr": self.stderr,
            "intercept": self.intercept,
            "points": self.points,
        }


def fit_line(x: list[float], y: list[float]) -> SlopeFit:
    """Ordinary least squares of y on x; the slope's standard error from the residual variance."""
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if len(x) < 3 or len(set(x)) < 2:
        raise ValueError(f"a slope with a confidence interval needs >= 3 points at >= 2 distinct x, got {len(x)}")
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sxx
    intercept = my - slope * mx
    residual = sum((b - intercept - slope * a) ** 2 for a, b in zip(x, y, strict=True))
    stderr = math.sqrt(residual / (n - 2) / sxx)
    half = student_t_quantile(0.975, n - 2) * stderr
    return SlopeFit(slope, intercept, (slope - half, slope + half), stderr, n)


def fit_power_law(x: list[float], y: list[float]) -> SlopeFit:
    """The exponent of y ~ x^slope: a line through (log x, log y)."""
    if min(x) <= 0 or min(y) <= 0:
        raise ValueError("a power law needs positive x and y")
    return fit_line([math.log(a) for a in x], [math.log(b) for b in y])


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


# --------------------------------------------------------------------------------------------- plots


def save_figure(fig, out: Path, name: str) -> str:
    """Lays ``fig`` out and writes it to ``out / name`` (``sigattn.plotting.save_figure``); returns ``name``,
    for ``Outcome.figures``."""
    fig.tight_layout()
    plotting.save_figure(fig, out / name)
    return name


# Each attention's colour, marker and line style (``sigattn.plotting.STYLES``): where two curves overlap,
# both stay visible (the markers hollow).
COLORS = {kind: style["color"] for kind, style in plotting.STYLES.items()}
MARKERS = {kind: style["marker"] for kind, style in plotting.STYLES.items()}
LINESTYLES = {kind: style["linestyle"] for kind, style in plotting.STYLES.items()}
