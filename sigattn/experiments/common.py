"""What every experiment shares: its sizes, the verdict and outputs it writes, the slope fit, ``judge`` (the
one rule that turns a 95% interval over seeds, from ``sigattn.stats``, into supported / contradicted /
inconclusive) and the plots.

An experiment is a function ``run(size, out_dir) -> Outcome`` registered under its name (``sigattn.
experiments.EXPERIMENTS``). ``run_experiment`` times it and writes into ``out_dir``:

    result.json   the measured numbers (experiment-specific keys at the top level), the verdict, the
                  settings and where and how it ran (versions, CPU, date, command, seconds)
    report.md     the claim, the setup, the numbers and the verdict, all generated from result.json's values
    *.png         the plots

Sizes: ``full`` (the documented setting), ``quick`` (a few minutes on a 2-core CPU: ``--quick``), ``test``
(seconds: the test suite's) and, for the experiments whose claim is about scale, ``gpu`` (minutes on one
GPU; ``Experiment.sizes`` says which an experiment has).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import plotting
from ..runinfo import cpu_name, device_label, module_version, strict_json, utc_date, versions
from ..stats import POWER_FORMULA, SeedSummary, student_t_quantile, summarize_seeds

SIZES = ("test", "quick", "full", "gpu")
CPU_SIZES = ("test", "quick", "full")
# The experiments' models are tiny: one intra-op thread avoids oversubscribing a shared CPU (a k-sum training
# step on the 2-core development machine under load: 18 ms with 1 thread, 276 ms with 2).
CPU_THREADS = 1


@dataclass
class Verdict:
    """Whether the measured numbers support the claim, decided by ``rule`` (stated in the report).

    ``supports`` is None when the rule cannot decide: inconclusive (e.g. an interval over seeds that straddles
    the claim's bound; ``summary`` says why)."""

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
    sizes: tuple[str, ...] = CPU_SIZES  # the sizes it has settings for (a subset of SIZES)


def check_size(size: str, experiment: Experiment | None = None) -> str:
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(map(repr, SIZES))}; got {size!r}")
    if experiment is not None and size not in experiment.sizes:
        raise ValueError(
            f"experiment {experiment.name!r} has no size {size!r}; its sizes: {', '.join(map(repr, experiment.sizes))}"
        )
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
    """Where and how the experiment ran: ``device`` is the GPU's name when the run used CUDA, else "cpu"."""
    found = versions()
    on_gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        **{name: found[name] for name in ("sigattn", "torch", "python")},
        "triton": module_version("triton"),
        "cuda": torch.version.cuda,
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "device": device_label() if on_gpu else "cpu",
        "date": utc_date(),
        "command": command,
    }


def run_experiment(
    experiment: Experiment, size: str, out_dir: str | Path, *, log=print, command: str | None = None
) -> dict:
    """Runs ``experiment`` at ``size`` and writes result.json, report.md and its plots into ``out_dir``;
    returns result.json's contents. ``command`` (the command line, if any) is recorded."""
    check_size(size, experiment)
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
    (out / "result.json").write_text(strict_json(result, indent=2, default=_jsonable) + "\n")
    (out / "report.md").write_text(report_markdown(experiment, outcome, meta))
    log(f"{experiment.name}: {outcome.verdict.word} — {outcome.verdict.summary} ({seconds:.0f} s; {out})")
    return result


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def where(meta: dict) -> str:
    """The machine a result ran on, in words: the GPU with its CUDA and Triton versions, else the CPU."""
    cpu = f"{meta['cpu']} ({meta['threads']} intra-op thread(s))"
    if meta.get("device", "cpu") == "cpu":
        return cpu
    return f"{meta['device']} (CUDA {meta['cuda']}, Triton {meta['triton']}; host {cpu})"


def report_markdown(experiment: Experiment, outcome: Outcome, meta: dict) -> str:
    verdict = outcome.verdict
    size_note = ""
    if meta["size"] in ("test", "quick"):
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
        f"Size `{meta['size']}`, {meta['seconds']:.0f} s on {where(meta)}, "
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


# ------------------------------------------------------------------------------------- over seeds

# A verdict rests on a statistic measured once per seed (an independent repetition of the whole measurement):
# its mean over the seeds, the 95% t-interval of that mean, and the smallest difference the seeds could have
# detected. Each part of a claim says where the statistic should lie (a ``Claim``); ``judge`` applies one rule.
SEED_RULE = (
    "each statistic is measured once per seed (an independent repetition of the whole measurement with its own "
    "random draws); its 95% interval is the t-interval of the mean over the n seeds, mean ± t(0.975, n−1)·s/√n, "
    "with s the between-seed standard deviation. A part of the claim is *supported* when the interval lies entirely "
    "inside the range the claim predicts; *contradicted* only when the interval excludes the claim: it lies "
    "entirely on the other side of the claim's bound, or, for a claimed difference of a stated size, it excludes "
    "differences of that size; otherwise it is *inconclusive*, with the reason (the interval straddles the bound; "
    "whether the detectable difference exceeds the claimed effect). The verdict supports the claim when every part "
    "is supported, does not support it when any part is contradicted, and is inconclusive otherwise."
)


@dataclass(frozen=True)
class Claim:
    """Where one statistic should lie if the paper's claim holds: strictly between ``low`` and ``high``.

    A one-sided claim of a difference (one bound infinite) may name ``effect``, the smallest size beyond the
    bound that counts as the claimed effect: an interval that excludes differences of that size contradicts
    the claim even where it overlaps the bound."""

    statistic: str  # what is measured per seed, e.g. "slope(sigmoid) − slope(softmax), dense"
    low: float = -math.inf
    high: float = math.inf
    effect: float | None = None

    def __post_init__(self):
        if not self.low < self.high:
            raise ValueError(f"a claim needs low < high, got {self.low} and {self.high}")
        if self.effect is not None and (self.effect <= 0 or math.isfinite(self.low) == math.isfinite(self.high)):
            raise ValueError(f"effect must be positive and needs a one-sided claim, got {self}")

    def range_text(self) -> str:
        if math.isinf(self.low):
            return f"< {self.high:g}"
        if math.isinf(self.high):
            return f"> {self.low:g}"
        return f"in ({self.low:g}, {self.high:g})"

    def effect_range(self) -> tuple[float, float]:
        """The values that show the claimed effect at its stated size (the whole claimed range without one)."""
        if self.effect is None:
            return (self.low, self.high)
        if math.isinf(self.low):
            return (self.low, self.high - self.effect)
        return (self.low + self.effect, self.high)

    def bounds(self) -> list[float]:
        return [b for b in (self.low, self.high) if math.isfinite(b)]


@dataclass
class Judgement:
    """One part of a claim judged over seeds (``judge``)."""

    claim: Claim
    summary: SeedSummary
    supports: bool | None
    reason: str

    @property
    def word(self) -> str:
        return {True: "supported", False: "contradicted", None: "inconclusive"}[self.supports]

    def to_dict(self) -> dict:
        return {
            "statistic": self.claim.statistic,
            "claimed": self.claim.range_text(),
            "effect": self.claim.effect,
            **self.summary.to_dict(),
            "supports": self.supports,
            "reason": self.reason,
        }


def judge(values: list[float], claim: Claim) -> Judgement:
    """Applies ``SEED_RULE`` to one statistic's per-seed ``values``."""
    summary = summarize_seeds(values)
    if summary.ci95 is None:
        return Judgement(claim, summary, None, "one seed: no interval, so no decision")
    lo, hi = summary.ci95
    if not (math.isfinite(lo) and math.isfinite(hi)):  # summarize_seeds: a seed's value is nan or inf
        return Judgement(claim, summary, None, "a seed's value is not finite: no interval, so no decision")
    interval = f"95% interval [{lo:.3g}, {hi:.3g}]"
    if claim.low < lo and hi < claim.high:
        return Judgement(claim, summary, True, f"the {interval} lies inside the claimed range ({claim.range_text()})")
    if hi <= claim.low or lo >= claim.high:
        side = "above" if lo >= claim.high else "below"
        bound = claim.high if lo >= claim.high else claim.low
        return Judgement(claim, summary, False, f"the {interval} lies entirely {side} {bound:g}: the other side")
    effect_low, effect_high = claim.effect_range()
    if claim.effect is not None and (hi <= effect_low or lo >= effect_high):
        return Judgement(
            claim,
            summary,
            False,
            f"the {interval} excludes differences of the claimed size "
            f"({claim.effect:.3g} beyond {claim.bounds()[0]:g})",
        )
    straddled = " and ".join(f"{b:g}" for b in claim.bounds() if lo < b < hi) or claim.range_text()
    reason = f"the {interval} straddles {straddled}; the detectable difference is {summary.detectable:.3g}"
    if claim.effect is not None:
        relation = "larger than" if summary.detectable > claim.effect else "no larger than"
        reason += f", {relation} the claimed effect {claim.effect:.3g}"
    return Judgement(claim, summary, None, reason)


def combine(judgements: list[Judgement]) -> bool | None:
    """The verdict of a claim made of parts: False if any part is contradicted, True if all are supported,
    else None."""
    if any(j.supports is False for j in judgements):
        return False
    if all(j.supports is True for j in judgements):
        return True
    return None


def power_sentence(judgement: Judgement) -> str:
    """'With n seeds (SD s) a difference of δ would have been detected ...' for the report."""
    summary, claim = judgement.summary, judgement.claim
    if summary.detectable is None:
        return f"{claim.statistic}: one seed, no power statement."
    if len(claim.bounds()) == 1:
        bound = f"{claim.bounds()[0]:g}"
    else:
        bound = f"the nearer end of ({claim.low:g}, {claim.high:g})"
    sentence = (
        f"{claim.statistic}: with {summary.seeds} seeds (between-seed SD {summary.sd:.3g}) a true mean "
        f"{summary.detectable:.3g} away from {bound} would have been detected with 80% power"
    )
    if claim.effect is not None:
        could = "could" if summary.detectable <= claim.effect else "could not reliably"
        sentence += f"; the claimed effect {claim.effect:.3g} {could} have been detected"
    return sentence + "."


def judgements_markdown(judgements: list[Judgement]) -> str:
    """The per-seed values, mean, interval, spread and detectable difference of each judged statistic, the
    power statements and the formula."""
    rows = []
    for j in judgements:
        s = j.summary
        ci = "—" if s.ci95 is None else f"[{s.ci95[0]:.4g}, {s.ci95[1]:.4g}]"
        rows.append(
            [
                j.claim.statistic,
                j.claim.range_text() + ("" if j.claim.effect is None else f" (effect {j.claim.effect:.3g})"),
                ", ".join(f"{v:.3g}" for v in s.values),
                s.mean,
                ci,
                "—" if s.sd is None else s.sd,
                "—" if s.detectable is None else s.detectable,
                j.word,
            ]
        )
    header = ["statistic", "claim", "per seed", "mean", "95% CI", "SD", "detectable δ", "part"]
    lines = [markdown_table(header, rows), ""]
    lines += [f"* {power_sentence(j)}" for j in judgements]
    lines += ["", POWER_FORMULA]
    return "\n".join(lines)


def judgements_text(judgements: list[Judgement]) -> str:
    """One sentence per part, for the verdict's summary."""
    return "; ".join(
        f"{j.claim.statistic} {j.claim.range_text()}: mean {j.summary.mean:.3g}, {j.word} ({j.reason})"
        for j in judgements
    )


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


def draw_judgements(ax, judgements: list[Judgement]) -> None:
    """One row per judged statistic: its per-seed values (dots), the mean with its 95% interval (bar) and the
    range the claim predicts (shaded), so a reader sees which side of the bound the interval lies on."""
    points, means, lows, highs = [], [], [], []
    for row, j in enumerate(judgements):
        points += [(v, row) for v in j.summary.values]
        ci = j.summary.ci95 or (j.summary.mean, j.summary.mean)
        means.append((j.summary.mean, row))
        lows.append(j.summary.mean - ci[0])
        highs.append(ci[1] - j.summary.mean)
    seen = [v for v, _ in points] + [m - lo for (m, _), lo in zip(means, lows, strict=True)]
    seen += [m + hi for (m, _), hi in zip(means, highs, strict=True)]
    seen += [e for j in judgements for e in j.claim.effect_range() if math.isfinite(e)]
    pad = 0.1 * ((max(seen) - min(seen)) or 1.0)
    left, right = min(seen) - pad, max(seen) + pad
    for row, j in enumerate(judgements):
        low, high = max(j.claim.low, left), min(j.claim.high, right)
        ax.fill_betweenx([row - 0.35, row + 0.35], low, high, color="tab:green", alpha=0.12, lw=0)
        for bound in j.claim.bounds():
            ax.vlines(bound, row - 0.4, row + 0.4, color="gray", lw=1)
        if j.claim.effect is not None:  # the claimed effect's size: an interval short of it contradicts the claim
            edge = next(e for e in j.claim.effect_range() if math.isfinite(e))
            ax.vlines(edge, row - 0.4, row + 0.4, color="tab:green", lw=1, linestyles="dashed")
    ax.scatter(
        [v for v, _ in points], [r + 0.15 for _, r in points], s=14, color="tab:gray", alpha=0.7, label="per seed"
    )
    ax.errorbar(
        [m for m, _ in means],
        [r for _, r in means],
        xerr=[lows, highs],
        fmt="D",
        color="black",
        capsize=4,
        label="mean and 95% interval over seeds",
    )
    ax.set_xlim(left, right)
    ax.set_ylim(len(judgements) - 0.5, -0.5)
    ax.set_yticks(range(len(judgements)), [f"{j.claim.statistic}\n(claim {j.claim.range_text()})" for j in judgements])
    ax.set_xlabel("per-seed statistic (shaded: the range the claim predicts; dashed: the claimed effect's size)")
    ax.legend(fontsize=7)


def judgements_figure(judgements: list[Judgement], out: Path, name: str, title: str) -> str:
    """A figure of ``draw_judgements`` alone, written to ``out / name``; returns ``name``."""
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(10, 1.6 + 1.1 * len(judgements)))
    draw_judgements(ax, judgements)
    ax.set_ylabel("statistic")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, out, name)
