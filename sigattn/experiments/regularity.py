"""regularity: the local Lipschitz constant of one attention layer as the input radius grows (arXiv 2409.04431).

One single-head attention layer on n tokens of dimension d, with fixed random projections:

    sigmoid:  f(X) = sigmoid(X Wq (X Wk)^T / sqrt(d) - log n) X Wv
    softmax:  f(X) = softmax(X Wq (X Wk)^T / sqrt(d)) X Wv

Its local Lipschitz constant at X is the largest singular value of the Jacobian df/dX (an (n d) x (n d)
matrix), found by power iteration on J^T J with autograd's Jacobian-vector and vector-Jacobian products,
never forming J. For each radius r (every token has norm r) we take the largest value over random inputs,
each then pushed a few steps uphill (gradient ascent on |J(X) v| with v the current top singular vector,
projected back onto the radius-r spheres): a lower bound on the worst case over the ball.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

from ..plotting import label_log_ticks, pyplot
from .common import COLORS, LINESTYLES, MARKERS, Outcome, Verdict, fit_line, markdown_table, save_figure

KINDS = ("sigmoid", "softmax")


@dataclass(frozen=True)
class Settings:
    tokens: int
    dim: int
    radii: tuple[float, ...]
    inputs_per_radius: int
    power_iterations: int
    ascent_steps: int
    fit_from_radius: float = 2.0  # the growth models are fitted to radii >= this (the growth regime)
    seed: int = 0


def geometric(start: float, stop: float, count: int) -> tuple[float, ...]:
    return tuple(round(start * (stop / start) ** (i / (count - 1)), 4) for i in range(count))


SETTINGS = {
    "test": Settings(
        tokens=4, dim=4, radii=geometric(0.5, 8, 5), inputs_per_radius=1, power_iterations=15, ascent_steps=1
    ),
    "quick": Settings(
        tokens=8, dim=8, radii=geometric(0.25, 16, 9), inputs_per_radius=4, power_iterations=30, ascent_steps=5
    ),
    "full": Settings(
        tokens=16, dim=16, radii=geometric(0.25, 32, 15), inputs_per_radius=6, power_iterations=40, ascent_steps=10
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


def decide(results: dict) -> Verdict:
    sig, soft = results["sigmoid"]["fit"], results["softmax"]["fit"]
    ok = sig["growth"] == "polynomial" and soft["growth"] == "exponential"
    rule = (
        "each curve is fitted over the radii >= the stated start by a power law (log L linear in log r) and by "
        "an exponential (log L linear in r); the growth type is the model with the smaller residual RMS of "
        "log L. Supports iff sigmoid's type is polynomial and softmax's is exponential."
    )

    def describe(kind, fit):
        return (
            f"{kind}: {fit['growth']} (L ~ r^{fit['polynomial']['exponent']:.2f}, RMS "
            f"{fit['polynomial']['rms']:.3f}; L ~ e^({fit['exponential']['rate']:.3f} r), RMS "
            f"{fit['exponential']['rms']:.3f})"
        )

    return Verdict(ok, rule, f"{describe('sigmoid', sig)}; {describe('softmax', soft)}.")


def plot(results: dict, settings: Settings, out: Path) -> str:
    """The measured constants, and the two growth models the verdict compares, fitted over the shaded radii:
    the power laws on the log-log panel and the exponentials on the log-linear one (where each is a line)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    panels = (("log", "polynomial", "power-law fit"), ("linear", "exponential", "exponential fit"))
    for ax, (xscale, model, name) in zip(axes, panels, strict=True):
        for kind in KINDS:
            res = results[kind]
            ax.plot(
                settings.radii,
                res["lipschitz"],
                color=COLORS[kind],
                marker=MARKERS[kind],
                markerfacecolor="none",
                markeredgewidth=1.5,
                lw=1,
                label=kind,
            )
            fit = res["fit"][model]
            radii = res["fit"]["fitted_radii"]
            if model == "polynomial":
                curve = [math.exp(fit["intercept"]) * r ** fit["exponent"] for r in radii]
                what = f"r^{fit['exponent']:.2f}"
            else:
                curve = [math.exp(fit["intercept"] + fit["rate"] * r) for r in radii]
                what = f"e^({fit['rate']:.3f} r)"
            ax.plot(
                radii,
                curve,
                LINESTYLES[kind] if kind == "softmax" else ":",
                color=COLORS[kind],
                lw=2,
                alpha=0.8,
                label=f"{kind} {name}: L ~ {what}, RMS {fit['rms']:.3f}",
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


def run(size: str, out: Path, log=print) -> Outcome:
    settings = SETTINGS[size]
    generator = torch.Generator().manual_seed(settings.seed)
    weights = make_weights(settings.dim, generator)
    results = {}
    for kind in KINDS:

        def layer(x, kind=kind):
            return attention_layer(x, weights, kind)

        values = []
        for radius in settings.radii:
            values.append(local_lipschitz(layer, radius, settings, generator))
            log(f"  regularity {kind} r={radius}: {values[-1]:.4g}")
        results[kind] = {
            "lipschitz": values,
            "fit": growth_fits(list(settings.radii), values, settings.fit_from_radius),
        }
    results["radii"] = list(settings.radii)
    verdict = decide(results)
    figure = plot(results, settings, out)
    setup = f"""
* One attention head on n = {settings.tokens} tokens of dimension d = {settings.dim}; Wq, Wk, Wv with N(0, 1/d)
  entries (seed {settings.seed}), float64, scale 1/√d, no mask. Sigmoid: `sigmoid(q·k/√d − log n)`; softmax:
  `softmax(q·k/√d)`.
* Local Lipschitz constant at X = the largest singular value of the (n·d × n·d) Jacobian, by power iteration
  on JᵀJ with autograd's jvp/vjp ({settings.power_iterations} iterations).
* Radii r = {", ".join(map(str, settings.radii))} (every token scaled to norm r). Per radius: the largest value
  over {settings.inputs_per_radius} random inputs, each followed by {settings.ascent_steps} projected
  gradient-ascent steps on |J(X)v| — a lower bound on the worst case over the ball.
* Growth models fitted over r ≥ {settings.fit_from_radius}.
"""
    rows = [
        [r, results["sigmoid"]["lipschitz"][i], results["softmax"]["lipschitz"][i]]
        for i, r in enumerate(settings.radii)
    ]
    fits = []
    for kind in KINDS:
        fit = results[kind]["fit"]
        poly, expo = fit["polynomial"], fit["exponential"]
        numbers = [round(poly["exponent"], 3), round(poly["rms"], 4), round(expo["rate"], 4), round(expo["rms"], 4)]
        fits.append([kind, fit["growth"], *numbers])
    findings = (
        "Each value is the largest found by the search: a lower bound on the worst case over the ball, so a "
        "growth faster than the one measured is not excluded.\n\n"
        + markdown_table(["radius r", "sigmoid", "softmax"], rows)
        + "\n\n"
        + markdown_table(
            [
                "attention",
                "growth",
                "power-law exponent p",
                "RMS (power law)",
                "exponential rate g",
                "RMS (exponential)",
            ],
            fits,
        )
    )
    return Outcome(results, verdict, asdict(settings), setup, findings, [figure])
