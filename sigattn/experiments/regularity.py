"""regularity: the local Lipschitz constant of one attention layer as the input radius grows (arXiv 2409.04431).

One single-head attention layer on n tokens of dimension d, with fixed random projections:

    sigmoid:  f(X) = sigmoid(X Wq (X Wk)^T / sqrt(d) - log n) X Wv
    softmax:  f(X) = softmax(X Wq (X Wk)^T / sqrt(d)) X Wv

Its local Lipschitz constant at X is the largest singular value of the Jacobian df/dX (an (n d) x (n d)
matrix), found by power iteration on J^T J with autograd's Jacobian-vector and vector-Jacobian products,
never forming J. For each radius r (every token has norm r) we take the largest value over random inputs,
each then pushed a few steps uphill (gradient ascent on |J(X) v| with v the current top singular vector,
projected back onto the radius-r spheres): a lower bound on the worst case over the ball.

Each seed draws its own projections and inputs; per seed and attention, the growth over r >= 2 is fitted by a
power law and by an exponential, and the statistic is the difference of their residual RMS (negative: the
power law fits better). The verdict reads its mean over seeds with the 95% t-interval (``common.judge``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

from ..plotting import label_log_ticks, pyplot
from ..stats import summarize_seeds
from .common import (
    COLORS,
    LINESTYLES,
    MARKERS,
    SEED_RULE,
    Claim,
    Judgement,
    Outcome,
    Verdict,
    combine,
    fit_line,
    judge,
    judgements_figure,
    judgements_markdown,
    judgements_text,
    markdown_table,
    save_figure,
)

KINDS = ("sigmoid", "softmax")


@dataclass(frozen=True)
class Settings:
    tokens: int
    dim: int
    radii: tuple[float, ...]
    inputs_per_radius: int
    power_iterations: int
    ascent_steps: int
    seeds: tuple[int, ...]  # independent repetitions: each its own Wq, Wk, Wv and inputs
    fit_from_radius: float = 2.0  # the growth models are fitted to radii >= this (the growth regime)


def geometric(start: float, stop: float, count: int) -> tuple[float, ...]:
    return tuple(round(start * (stop / start) ** (i / (count - 1)), 4) for i in range(count))


# full: one seed's two curves take ~45 s on the 2-core development CPU, so 8 seeds ~6 min.
SETTINGS = {
    "test": Settings(
        tokens=4,
        dim=4,
        radii=geometric(0.5, 8, 5),
        inputs_per_radius=1,
        power_iterations=15,
        ascent_steps=1,
        seeds=(0, 1),
    ),
    "quick": Settings(
        tokens=8,
        dim=8,
        radii=geometric(0.25, 16, 9),
        inputs_per_radius=4,
        power_iterations=30,
        ascent_steps=5,
        seeds=(0, 1, 2),
    ),
    "full": Settings(
        tokens=16,
        dim=16,
        radii=geometric(0.25, 32, 15),
        inputs_per_radius=6,
        power_iterations=40,
        ascent_steps=10,
        seeds=tuple(range(8)),
    ),
}


def make_weights(dim: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Wq, Wk, Wv (d, d) with N(0, 1/d) entries, float64."""
    return tuple(torch.randn(dim, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim) for _ in range(3))


def attention_layer(x: Tensor, weights: tuple[Tensor, Tensor, Tensor], kind: str) -> Tensor:
    """x (n, d) -> (n, d): one head, no mask; sigmoid with the bias -log n."""
    wq, wk, wv = weights
    q, k, v = x @ wq, x @ wk, x @ wv  # [n, d]
    logits = q @ k.T / math.sqrt(x.shape[-1])  # [n, n]
    if kind == "sigmoid":
        return torch.sigmoid(logits - math.log(x.shape[0])) @ v
    return torch.softmax(logits, dim=-1) @ v


def top_singular_value(
    f, x: Tensor, iterations: int, start: Tensor | None = None, generator: torch.Generator | None = None
) -> tuple[float, Tensor]:
    """The largest singular value of the Jacobian of f at x, by power iteration on J^T J (one
    Jacobian-vector and one vector-Jacobian product per step) from ``start`` (default: random); returns it
    and its right singular vector."""
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype) if start is None else start.clone()
    v = v / v.norm()
    _, pullback = vjp(f, x)
    for _ in range(iterations):
        jv = jvp(f, (x,), (v,))[1]
        w = pullback(jv)[0]  # J^T J v
        v = w / w.norm()
    return jvp(f, (x,), (v,))[1].norm().item(), v


def on_spheres(x: Tensor, radius: float) -> Tensor:
    """Every token (row) scaled to norm ``radius``."""
    return x * (radius / x.norm(dim=-1, keepdim=True))


def local_lipschitz(f, radius: float, settings: Settings, generator: torch.Generator) -> float:
    """The largest Jacobian norm found at inputs whose tokens all have norm ``radius``."""
    best = 0.0
    for _ in range(settings.inputs_per_radius):
        x = on_spheres(torch.randn(settings.tokens, settings.dim, generator=generator, dtype=torch.float64), radius)
        sigma, v = top_singular_value(f, x, settings.power_iterations, generator=generator)
        best = max(best, sigma)
        for _ in range(settings.ascent_steps):
            g = grad(lambda y, v=v: jvp(f, (y,), (v,))[1].norm())(x)  # d|J(x) v| / dx
            step = 0.1 * radius * g / g.norm().clamp(min=1e-30)
            x = on_spheres(x + step, radius)
            sigma, v = top_singular_value(f, x, settings.power_iterations // 2, start=v)
            best = max(best, sigma)
    return best


def growth_fits(radii: list[float], lipschitz: list[float], start: float) -> dict:
    """log L against log r (polynomial, L ~ r^p) and against r (exponential, L ~ e^(g r)) over r >= start;
    the model with the smaller residual RMS (in log L) is the growth type."""
    points = [(r, val) for r, val in zip(radii, lipschitz, strict=True) if r >= start]
    rs, logs = [p[0] for p in points], [math.log(p[1]) for p in points]
    poly = fit_line([math.log(r) for r in rs], logs)
    expo = fit_line(rs, logs)

    def rms(fit, xs):
        return math.sqrt(sum((y - fit.intercept - fit.slope * x) ** 2 for x, y in zip(xs, logs, strict=True)) / len(xs))

    poly_rms, expo_rms = rms(poly, [math.log(r) for r in rs]), rms(expo, rs)
    return {
        "polynomial": {"exponent": poly.slope, "ci95": list(poly.ci95), "rms": poly_rms, "intercept": poly.intercept},
        "exponential": {"rate": expo.slope, "ci95": list(expo.ci95), "rms": expo_rms, "intercept": expo.intercept},
        "growth": "polynomial" if poly_rms <= expo_rms else "exponential",
        "fitted_radii": rs,
    }


def rms_difference(fit: dict) -> float:
    """RMS of log L about the power law minus RMS about the exponential: < 0 where the power law fits better."""
    return fit["polynomial"]["rms"] - fit["exponential"]["rms"]


def judgements(differences: dict) -> list[Judgement]:
    """The claim's two parts over seeds: sigmoid's growth fits a power law better (difference < 0) and softmax's
    an exponential (difference > 0); ``differences`` maps each attention to its per-seed ``rms_difference``."""
    return [
        judge(differences["sigmoid"], Claim("RMS(power law) − RMS(exponential), sigmoid", high=0.0)),
        judge(differences["softmax"], Claim("RMS(power law) − RMS(exponential), softmax", low=0.0)),
    ]


def decide(parts: list[Judgement]) -> Verdict:
    rule = (
        "per seed, each attention's curve is fitted over the radii >= the stated start by a power law (log L "
        "linear in log r) and by an exponential (log L linear in r); the statistic is the residual RMS of log L "
        "about the power law minus that about the exponential (negative: polynomial growth fits better). The "
        "claim's two parts: sigmoid's statistic < 0 (polynomial) and softmax's > 0 (exponential). Then "
        f"{SEED_RULE}"
    )
    return Verdict(combine(parts), rule, judgements_text(parts) + ".")


def geometric_mean(rows: list[list[float]]) -> list[float]:
    return [math.exp(sum(math.log(v) for v in col) / len(col)) for col in zip(*rows, strict=True)]


def mean_fit(per_seed: list[dict], model: str, key: str) -> tuple[float, float, float]:
    """The mean over seeds of a growth model's slope (``key``), intercept and RMS: the mean of per-seed least
    squares on the same x is the least-squares fit of the mean log L."""
    fits = [seed["fit"][model] for seed in per_seed]
    return tuple(sum(f[name] for f in fits) / len(fits) for name in (key, "intercept", "rms"))


def plot(results: dict, settings: Settings, out: Path) -> str:
    """The measured constants (thin: each seed; markers: the geometric mean over seeds), and the two growth
    models the verdict compares, with the mean over seeds of each fit over the shaded radii: the power laws on
    the log-log panel and the exponentials on the log-linear one (where each is a line)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    panels = (("log", "polynomial", "power-law fit"), ("linear", "exponential", "exponential fit"))
    for ax, (xscale, model, name) in zip(axes, panels, strict=True):
        for kind in KINDS:
            res = results[kind]
            for seed in res["per_seed"]:
                ax.plot(settings.radii, seed["lipschitz"], color=COLORS[kind], lw=0.6, alpha=0.3)
            ax.plot(
                settings.radii,
                res["lipschitz"],
                color=COLORS[kind],
                marker=MARKERS[kind],
                markerfacecolor="none",
                markeredgewidth=1.5,
                lw=1,
                label=f"{kind}: geometric mean of {len(res['per_seed'])} seeds",
            )
            radii = res["per_seed"][0]["fit"]["fitted_radii"]
            if model == "polynomial":
                exponent, intercept, rms = mean_fit(res["per_seed"], model, "exponent")
                curve = [math.exp(intercept) * r**exponent for r in radii]
                what = f"r^{exponent:.2f}"
            else:
                rate, intercept, rms = mean_fit(res["per_seed"], model, "rate")
                curve = [math.exp(intercept + rate * r) for r in radii]
                what = f"e^({rate:.3f} r)"
            ax.plot(
                radii,
                curve,
                LINESTYLES[kind] if kind == "softmax" else ":",
                color=COLORS[kind],
                lw=2,
                alpha=0.8,
                label=f"{kind} {name} (mean of seeds): L ~ {what}, RMS {rms:.3f}",
            )
        ax.axvspan(settings.fit_from_radius, max(settings.radii), color="gray", alpha=0.08, lw=0)
        ax.set_xscale(xscale)
        if xscale == "log":  # powers of two: the default minor-tick labels collide on a short log axis
            low, high = math.floor(math.log2(min(settings.radii))), math.ceil(math.log2(max(settings.radii)))
            label_log_ticks(ax.xaxis, [2.0**k for k in range(low, high + 1)])
        ax.set_yscale("log")
        ax.set_xlabel("token radius r (shaded: the fitted range)")
        ax.set_ylabel("largest Jacobian singular value found")
        ax.set_title("log-log: a power law is a line" if xscale == "log" else "log-linear: an exponential is a line")
        ax.legend(fontsize=7)
    fig.suptitle(f"Local Lipschitz constant of one attention layer (n={settings.tokens}, d={settings.dim})")
    return save_figure(fig, out, "regularity.png")


def measure_seed(settings: Settings, seed: int, log) -> dict:
    """One seed: fresh Wq, Wk, Wv (shared by both attentions) and inputs; each attention's constants per radius
    and growth fits."""
    generator = torch.Generator().manual_seed(seed)
    weights = make_weights(settings.dim, generator)
    found = {}
    for kind in KINDS:

        def layer(x, kind=kind):
            return attention_layer(x, weights, kind)

        values = [local_lipschitz(layer, radius, settings, generator) for radius in settings.radii]
        fit = growth_fits(list(settings.radii), values, settings.fit_from_radius)
        found[kind] = {"seed": seed, "lipschitz": values, "fit": fit, "rms_difference": rms_difference(fit)}
        log(
            f"  regularity {kind} seed {seed}: L(r={settings.radii[-1]}) = {values[-1]:.4g}, "
            f"RMS(power law) - RMS(exponential) = {found[kind]['rms_difference']:+.3f}"
        )
    return found


def run(size: str, out: Path, log=print) -> Outcome:
    settings = SETTINGS[size]
    seeds = [measure_seed(settings, seed, log) for seed in settings.seeds]
    results = {"radii": list(settings.radii)}
    for kind in KINDS:
        per_seed = [found[kind] for found in seeds]
        results[kind] = {
            "lipschitz": geometric_mean([seed["lipschitz"] for seed in per_seed]),
            "rms_difference": summarize_seeds([seed["rms_difference"] for seed in per_seed]).to_dict(),
            "exponent": summarize_seeds([seed["fit"]["polynomial"]["exponent"] for seed in per_seed]).to_dict(),
            "rate": summarize_seeds([seed["fit"]["exponential"]["rate"] for seed in per_seed]).to_dict(),
            "per_seed": per_seed,
        }
    parts = judgements({kind: results[kind]["rms_difference"]["values"] for kind in KINDS})
    results["judgements"] = [j.to_dict() for j in parts]
    verdict = decide(parts)
    figures = [
        plot(results, settings, out),
        judgements_figure(
            parts, out, "regularity_seeds.png", f"regularity: the verdict's statistics over {len(settings.seeds)} seeds"
        ),
    ]
    setup = f"""
* One attention head on n = {settings.tokens} tokens of dimension d = {settings.dim}; Wq, Wk, Wv with N(0, 1/d)
  entries, float64, scale 1/√d, no mask. Sigmoid: `sigmoid(q·k/√d − log n)`; softmax: `softmax(q·k/√d)`.
* {len(settings.seeds)} seeds ({", ".join(map(str, settings.seeds))}): each draws its own Wq, Wk, Wv (shared by
  both attentions) and its own inputs; the per-seed settings are those of the earlier one-seed run.
* Local Lipschitz constant at X = the largest singular value of the (n·d × n·d) Jacobian, by power iteration
  on JᵀJ with autograd's jvp/vjp ({settings.power_iterations} iterations).
* Radii r = {", ".join(map(str, settings.radii))} (every token scaled to norm r). Per radius and seed: the largest
  value over {settings.inputs_per_radius} random inputs, each followed by {settings.ascent_steps} projected
  gradient-ascent steps on |J(X)v| — a lower bound on the worst case over the ball.
* Growth models fitted per seed over r ≥ {settings.fit_from_radius}; the statistic per seed and attention is
  RMS(power law) − RMS(exponential) of log L.
"""
    rows = [
        [r, results["sigmoid"]["lipschitz"][i], results["softmax"]["lipschitz"][i]]
        for i, r in enumerate(settings.radii)
    ]
    fits = []
    for kind in KINDS:
        res = results[kind]
        for name, key in (("power-law exponent p", "exponent"), ("exponential rate g", "rate")):
            entry = res[key]
            ci = "—" if entry["ci95"] is None else f"[{entry['ci95'][0]:.3g}, {entry['ci95'][1]:.3g}]"
            fits.append([kind, name, ", ".join(f"{v:.3g}" for v in entry["values"]), entry["mean"], ci])
    findings = (
        "Each value is the largest found by the search: a lower bound on the worst case over the ball, so a "
        "growth faster than the one measured is not excluded.\n\n"
        + "Geometric mean over seeds of the constant per radius:\n\n"
        + markdown_table(["radius r", "sigmoid", "softmax"], rows)
        + "\n\nThe fitted growth parameters, per seed and over seeds:\n\n"
        + markdown_table(["attention", "parameter", "per seed", "mean", "95% CI over seeds"], fits)
        + "\n\nThe verdict's statistics:\n\n"
        + judgements_markdown(parts)
    )
    return Outcome(results, verdict, asdict(settings), setup, findings, figures)
