"""moe-rates: how fast least squares recovers a sigmoid- or softmax-gated mixture of experts (arXiv 2502.00281).

One attention row is a mixture of experts: the query-key products are quadratic affinity scores of the
input and the values are linear experts. With x in R^d, k atoms (A_i, c_i, eta_i), A_i symmetric:

    s_i(x) = x^T A_i x + c_i                              the affinity score
    sigmoid:  f(x) = sum_i sigmoid(s_i(x)) * eta_i . x
    softmax:  f(x) = sum_i softmax_i(s(x)) * eta_i . x

Data: x ~ Uniform[-1, 1]^d, y = f_true(x) + N(0, NOISE^2). Over-specified fit: k = k_true + 1 atoms, least
squares over a compact box (BOX; the scores' constants c_i <= 0, which rules out the exact alternative
representation sigmoid(s) = 1 - sigmoid(-s) that makes the over-specified sigmoid model unidentifiable),
by Levenberg-Marquardt (damped Gauss-Newton on the analytic per-sample gradients), started from several
random restarts near the truth; the restart with the lowest training error is the estimate. Every
(replicate, restart) pair is one row of batched float64 tensors, so a sample size is one batched solve.

The Voronoi loss between a fitted G and the truth G* (the exact formula is in ``voronoi_loss``) is zero
exactly on the parameters that reproduce the true regression function (an extra atom that merges with a
true one, or whose contribution vanishes) and grows with any perturbation. Its least-squares slope against n
on log-log axes, over one seed's replicate-level points, is that seed's measured rate. Every seed draws its
own data sets and restarts, the same for both gates (so the slopes are paired by seed), and the verdict reads
the mean over seeds of the slope difference, with its 95% t-interval (``common.judge``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

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
    fit_power_law,
    judge,
    judgements_figure,
    judgements_markdown,
    judgements_text,
    markdown_table,
    save_figure,
)

KINDS = ("sigmoid", "softmax")
REGIMES = ("dense", "sparse")
DIM = 2
NOISE = 0.1
BOX = 10.0  # every fitted parameter in [-BOX, BOX]; the constants c_i in [-BOX, 0]
INIT_SPREAD = 0.3  # restarts start at the true atoms plus N(0, INIT_SPREAD^2) on every parameter
NEAR_HALF = (-0.6, -0.4)  # "near n^(-1/2)": the mean slope's 95% interval lies inside this range
# The smallest slope difference (sigmoid's exponent below softmax's) counted as "faster": our choice, the paper
# states no size. An interval over seeds that excludes differences this large contradicts the claim.
FASTER_BY = 0.1


@dataclass(frozen=True)
class TrueModel:
    """k_true atoms: A (k, d, d) symmetric, c (k,), eta (k, d)."""

    A: tuple
    c: tuple
    eta: tuple

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return (
            torch.tensor(self.A, dtype=torch.float64),
            torch.tensor(self.c, dtype=torch.float64),
            torch.tensor(self.eta, dtype=torch.float64),
        )


# Dense: every true gating matrix is non-zero, so every gate depends on the input. Sparse: the first
# expert's gating matrix is zero (its gate is a constant). The values are the same in both.
TRUTH = {
    "dense": TrueModel(
        A=(((4.5, 1.5), (1.5, -3.0)), ((-3.0, 3.0), (3.0, 4.5))), c=(-0.5, -1.0), eta=((2.0, -1.0), (-1.0, 2.0))
    ),
    "sparse": TrueModel(
        A=(((0.0, 0.0), (0.0, 0.0)), ((-3.0, 3.0), (3.0, 4.5))), c=(-0.5, -1.0), eta=((2.0, -1.0), (-1.0, 2.0))
    ),
}


@dataclass(frozen=True)
class Settings:
    sample_sizes: tuple[int, ...]
    replicates: int  # independent data sets per sample size and seed
    restarts: int  # fits per data set; the one with the lowest training error is kept
    iterations: int  # Levenberg-Marquardt iterations
    seeds: tuple[int, ...]  # independent repetitions of the whole measurement, one slope per gate each
    extra_atoms: int = 1  # fitted atoms beyond the true number


# full: 4 replicates x 2 restarts per seed and n (the one-seed run before used 12 x 4, 646 s); one seed's four
# slopes take ~80 s on the 2-core development CPU, so 8 seeds fit in ~11 min.
SETTINGS = {
    "test": Settings(sample_sizes=(100, 300, 1000), replicates=2, restarts=1, iterations=25, seeds=(0, 1)),
    "quick": Settings(sample_sizes=(200, 800, 3200), replicates=4, restarts=2, iterations=100, seeds=(0, 1, 2)),
    "full": Settings(
        sample_sizes=(200, 387, 746, 1442, 2785, 5378, 10386, 20000),
        replicates=4,
        restarts=2,
        iterations=150,
        seeds=tuple(range(8)),
    ),
}


# ------------------------------------------------------------------------------------------- the model


def triu(dim: int) -> Tensor:
    return torch.triu_indices(dim, dim)


def quadratic_features(x: Tensor) -> Tensor:
    """x (..., d) -> the monomials x_a x_b, a <= b, with off-diagonal ones doubled (..., d(d+1)/2), so
    that x^T A x = features . (the upper triangle of A)."""
    rows, cols = triu(x.shape[-1])
    return x[..., rows] * x[..., cols] * torch.where(rows == cols, 1.0, 2.0).to(x.dtype)


def pack(A: Tensor, c: Tensor, eta: Tensor) -> Tensor:
    """Atoms as one parameter vector each: (..., k, d(d+1)/2 + 1 + d) = [upper triangle of A, c, eta]."""
    rows, cols = triu(A.shape[-1])
    return torch.cat([A[..., rows, cols], c[..., None], eta], dim=-1)


def unpack(theta: Tensor, dim: int = DIM) -> tuple[Tensor, Tensor, Tensor]:
    rows, cols = triu(dim)
    q = len(rows)
    A = theta.new_zeros(*theta.shape[:-1], dim, dim)
    A[..., rows, cols] = theta[..., :q]
    A[..., cols, rows] = theta[..., :q]
    return A, theta[..., q], theta[..., q + 1 :]


def moe_forward(theta: Tensor, x: Tensor, kind: str, jacobian: bool = False):
    """f(x) of P models at once: theta (P, k, p), x (P, n, d) -> f (P, n); with ``jacobian`` also
    df/dtheta (P, n, k * p), computed in closed form."""
    dim = x.shape[-1]
    q = dim * (dim + 1) // 2
    feats = quadratic_features(x)  # [P, n, q]
    upper, c, eta = theta[..., :q], theta[..., q], theta[..., q + 1 :]
    scores = torch.einsum("pnq,pkq->pnk", feats, upper) + c[:, None, :]  # [P, n, k]
    experts = torch.einsum("pnd,pkd->pnk", x, eta)  # [P, n, k]
    gates = torch.sigmoid(scores) if kind == "sigmoid" else torch.softmax(scores, dim=-1)
    f = (gates * experts).sum(-1)  # [P, n]
    if not jacobian:
        return f
    # d f / d score_i: sigmoid's gates are independent; softmax's compete through the normalisation.
    dscore = gates * (1 - gates) * experts if kind == "sigmoid" else gates * (experts - f[..., None])  # [P, n, k]
    parts = [dscore[..., None] * feats[:, :, None, :], dscore[..., None], gates[..., None] * x[:, :, None, :]]
    return f, torch.cat(parts, dim=-1).flatten(2)  # [P, n, k * p]


def project(theta: Tensor) -> Tensor:
    """Onto the compact parameter box: all in [-BOX, BOX], the constants c_i in [-BOX, 0]."""
    q = DIM * (DIM + 1) // 2
    theta = theta.clamp(-BOX, BOX)
    theta[..., q] = theta[..., q].clamp(max=0.0)
    return theta


def least_squares(theta: Tensor, x: Tensor, y: Tensor, kind: str, iterations: int):
    """Projected Levenberg-Marquardt on the mean squared error of P independent problems.

    Each problem keeps its own damping: a step that lowers its error is taken and the damping divided by
    3, otherwise the step is dropped and the damping multiplied by 4. Returns the parameters, the final
    mean squared error (P,) and gradient norm (P,)."""
    n = x.shape[1]
    damping = torch.full((theta.shape[0],), 1e-2, dtype=theta.dtype)
    f, jac = moe_forward(theta, x, kind, jacobian=True)
    residual = f - y
    error = residual.pow(2).mean(1)
    eye = torch.eye(jac.shape[-1], dtype=theta.dtype)
    for _ in range(iterations):
        jtj = torch.einsum("pni,pnj->pij", jac, jac) / n
        grad = torch.einsum("pni,pn->pi", jac, residual) / n
        diag = torch.diag_embed(torch.diagonal(jtj, dim1=-2, dim2=-1))
        step = torch.linalg.solve(jtj + damping[:, None, None] * (diag + 1e-9 * eye), -grad)
        trial = project(theta + step.view_as(theta))
        f_new, jac_new = moe_forward(trial, x, kind, jacobian=True)
        residual_new = f_new - y
        error_new = residual_new.pow(2).mean(1)
        better = error_new < error
        theta = torch.where(better[:, None, None], trial, theta)
        jac = torch.where(better[:, None, None], jac_new, jac)
        residual = torch.where(better[:, None], residual_new, residual)
        error = torch.where(better, error_new, error)
        damping = torch.where(better, damping / 3, damping * 4).clamp(1e-10, 1e10)
    grad_norm = torch.einsum("pni,pn->pi", jac, residual).norm(dim=-1) / n
    return theta, error, grad_norm


# ------------------------------------------------------------------------------------- the Voronoi loss


def voronoi_loss(theta: Tensor, truth: Tensor, kind: str) -> Tensor:
    """The Voronoi loss of fitted atoms theta (R, k, p) against the true atoms truth (k*, p), (R,).

    With w_i the gate's mass (sigmoid: sigmoid(c_i); softmax: softmax(c)_i), u_i = w_i eta_i the atom's
    contribution, gamma_i its gate parameters (sigmoid: (A_i, c_i); softmax: A_i - sum_l w_l A_l, since
    softmax is unchanged by adding one matrix to every A_i) and the Voronoi cells
    V_j = {i : j = argmin_l |gamma_i - gamma*_l|}:

        D = sum_j |sum_{i in V_j} u_i - u*_j|
          + [softmax only] sum_j |sum_{i in V_j} w_i - w*_j|
          + sum_j sum_{i in V_j} |u_i| * |gamma_i - gamma*_j|^{r_j},     r_j = 1 if |V_j| = 1, else 2.

    Zero on every exact representation of the truth: an atom split in two (sigmoid: same gate, values
    summing to eta*; softmax: same gate matrix, masses and contributions summing to the truth's) or an
    extra atom whose contribution vanishes."""
    A, c, eta = unpack(theta)
    A_true, c_true, eta_true = unpack(truth)
    if kind == "sigmoid":
        mass, mass_true = torch.sigmoid(c), torch.sigmoid(c_true)
        gate = torch.cat([A.flatten(-2), c[..., None]], dim=-1)  # [R, k, d*d + 1]
        gate_true = torch.cat([A_true.flatten(-2), c_true[..., None]], dim=-1)  # [k*, d*d + 1]
    else:
        mass, mass_true = torch.softmax(c, dim=-1), torch.softmax(c_true, dim=-1)
        gate = (A - (mass[..., None, None] * A).sum(-3, keepdim=True)).flatten(-2)
        gate_true = (A_true - (mass_true[..., None, None] * A_true).sum(-3, keepdim=True)).flatten(-2)
    contribution = mass[..., None] * eta  # [R, k, d]
    contribution_true = mass_true[..., None] * eta_true  # [k*, d]
    distance = (gate[:, :, None, :] - gate_true[None, None]).norm(dim=-1)  # [R, k, k*]
    cell = distance.argmin(-1)  # [R, k]
    member = torch.nn.functional.one_hot(cell, truth.shape[0]).to(theta.dtype)  # [R, k, k*]
    cell_size = member.sum(1)  # [R, k*]
    summed = torch.einsum("rkj,rkd->rjd", member, contribution)  # [R, k*, d]
    loss = (summed - contribution_true).norm(dim=-1).sum(-1)
    if kind == "softmax":
        loss = loss + (torch.einsum("rkj,rk->rj", member, mass) - mass_true).abs().sum(-1)
    own_distance = distance.gather(-1, cell[..., None])[..., 0]  # [R, k]
    power = torch.where(cell_size.gather(-1, cell) > 1, 2.0, 1.0).to(theta.dtype)
    return loss + (contribution.norm(dim=-1) * own_distance**power).sum(-1)


# ------------------------------------------------------------------------------------------ experiment


def initial_atoms(truth: Tensor, problems: int, extra: int, generator: torch.Generator) -> Tensor:
    """Restart points: atom i < k* starts at true atom i, each extra atom at a random true atom, all plus
    N(0, INIT_SPREAD^2) noise, projected onto the box."""
    k_true = truth.shape[0]
    order = torch.arange(k_true).expand(problems, k_true)
    extra_ids = torch.randint(k_true, (problems, extra), generator=generator)
    start = truth[torch.cat([order, extra_ids], dim=1)]
    noise = torch.randn(start.shape, generator=generator, dtype=truth.dtype)
    return project(start + INIT_SPREAD * noise)


def measure(kind: str, regime: str, settings: Settings, seed: int, log) -> dict:
    """One seed: fits every (sample size, replicate) and returns the losses and the fitted slope. Both gates
    draw the same inputs, noise and restart perturbations for a seed (the comparison is paired)."""
    generator = torch.Generator().manual_seed(1000 * seed + REGIMES.index(regime))
    truth = pack(*TRUTH[regime].tensors())  # [k*, p]
    reps, restarts = settings.replicates, settings.restarts
    per_n = []
    for n in settings.sample_sizes:
        x = torch.rand(reps, n, DIM, generator=generator, dtype=torch.float64) * 2 - 1  # [R, n, d]
        clean = moe_forward(truth.expand(reps, -1, -1), x, kind)
        y = clean + NOISE * torch.randn(reps, n, generator=generator, dtype=torch.float64)
        start = initial_atoms(truth, reps * restarts, settings.extra_atoms, generator)
        theta, error, grad_norm = least_squares(
            start, x.repeat_interleave(restarts, 0), y.repeat_interleave(restarts, 0), kind, settings.iterations
        )
        best = error.view(reps, restarts).argmin(1) + torch.arange(reps) * restarts
        losses = voronoi_loss(theta[best], truth, kind)
        error_at_truth = (clean - y).pow(2).mean(1)
        per_n.append(
            {
                "n": n,
                "losses": losses.tolist(),
                "geometric_mean": math.exp(losses.log().mean().item()),
                "train_mse": error[best].mean().item(),
                "train_mse_at_truth": error_at_truth.mean().item(),
                "max_grad_norm": grad_norm[best].max().item(),
            }
        )
    xs = [p["n"] for p in per_n for _ in p["losses"]]
    ys = [loss for p in per_n for loss in p["losses"]]
    fit = fit_power_law(xs, ys)
    log(f"  moe-rates {regime} {kind} seed {seed}: slope {fit.slope:.3f}")
    return {"seed": seed, **fit.to_dict(), "per_n": per_n}


def slopes_of(results: dict) -> dict:
    """{regime: {kind: per-seed slopes}} from ``measure_all``'s results."""
    return {regime: {kind: results[regime][kind]["values"] for kind in KINDS} for regime in REGIMES}


def judgements(slopes: dict) -> list[Judgement]:
    """The claim's two parts over seeds, dense regime: sigmoid's slope below softmax's (paired by seed, by at
    least ``FASTER_BY`` to count as the claimed effect) and sigmoid's slope near -1/2."""
    sig, soft = slopes["dense"]["sigmoid"], slopes["dense"]["softmax"]
    return [
        judge(
            [a - b for a, b in zip(sig, soft, strict=True)],
            Claim("slope(sigmoid) − slope(softmax), dense", high=0.0, effect=FASTER_BY),
        ),
        judge(sig, Claim("slope(sigmoid), dense", low=NEAR_HALF[0], high=NEAR_HALF[1])),
    ]


def decide(parts: list[Judgement]) -> Verdict:
    rule = (
        "the claim has two parts, both in the dense regime: sigmoid's error falls faster than softmax's (the "
        f"per-seed slope difference slope(sigmoid) − slope(softmax) < 0; a difference of at least {FASTER_BY} "
        "is the claimed effect, our choice of size) and near n^(-1/2) (sigmoid's slope in "
        f"({NEAR_HALF[0]}, {NEAR_HALF[1]})). Each seed's slope is the least-squares slope of log loss on log n "
        f"over that seed's replicate-level points. Then {SEED_RULE}"
    )
    return Verdict(combine(parts), rule, judgements_text(parts) + ".")


def measure_all(settings: Settings, log) -> dict:
    """Every seed's slopes, and per (regime, gate) their summary over seeds and the losses pooled over seeds;
    per regime, the paired slope difference (sigmoid - softmax) over seeds."""
    results = {}
    for regime in REGIMES:
        results[regime] = {}
        for kind in KINDS:
            per_seed = [measure(kind, regime, settings, seed, log) for seed in settings.seeds]
            pooled = []
            for i, n in enumerate(settings.sample_sizes):
                rows = [seed["per_n"][i] for seed in per_seed]
                losses = [loss for row in rows for loss in row["losses"]]
                pooled.append(
                    {
                        "n": n,
                        "geometric_mean": math.exp(sum(map(math.log, losses)) / len(losses)),
                        "train_mse": sum(row["train_mse"] for row in rows) / len(rows),
                        "train_mse_at_truth": sum(row["train_mse_at_truth"] for row in rows) / len(rows),
                        "max_grad_norm": max(row["max_grad_norm"] for row in rows),
                    }
                )
            results[regime][kind] = {
                **summarize_seeds([seed["slope"] for seed in per_seed]).to_dict(),
                "intercept": sum(seed["intercept"] for seed in per_seed) / len(per_seed),
                "per_n": pooled,
                "per_seed": per_seed,
            }
        sig, soft = (results[regime][kind]["values"] for kind in KINDS)
        difference = [a - b for a, b in zip(sig, soft, strict=True)]
        results[regime]["difference"] = summarize_seeds(difference).to_dict()
    return results


def interval(entry: dict, digits: int = 3) -> str:
    ci = entry["ci95"]
    return "—" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def plot(results: dict, settings: Settings, out: Path) -> str:
    """Losses against n per regime (all seeds' replicates), the geometric means and the fitted power law whose
    slope is the mean of the per-seed slopes."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, regime in zip(axes, REGIMES, strict=True):
        for kind in KINDS:
            res = results[regime][kind]
            ns = [p["n"] for p in res["per_n"]]
            losses = [(p["n"], loss) for seed in res["per_seed"] for p in seed["per_n"] for loss in p["losses"]]
            ax.scatter(
                [n for n, _ in losses],
                [loss for _, loss in losses],
                s=6,
                alpha=0.25,
                color=COLORS[kind],
                marker=MARKERS[kind],
            )
            ax.plot(
                ns,
                [p["geometric_mean"] for p in res["per_n"]],
                MARKERS[kind],
                color=COLORS[kind],
                markerfacecolor="none",
                markeredgewidth=1.5,
                label=f"{kind}: geometric mean per n",
            )
            line = [math.exp(res["intercept"]) * n ** res["mean"] for n in ns]
            ax.plot(
                ns,
                line,
                LINESTYLES[kind],
                color=COLORS[kind],
                label=f"{kind} fit: mean slope {res['mean']:.2f} {interval(res, 2)}",
            )
        ref = [results[regime]["sigmoid"]["per_n"][0]["geometric_mean"] * (n / ns[0]) ** -0.5 for n in ns]
        ax.plot(ns, ref, ":", color="gray", label="n^(-1/2)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        label_log_ticks(ax.xaxis, ns)
        ax.tick_params(axis="x", labelrotation=30 if len(ns) > 5 else 0)
        ax.set_xlabel("sample size n")
        ax.set_title(f"{regime} gating")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("Voronoi loss (small points: replicates)")
    fig.suptitle(
        f"Least-squares recovery of a quadratic-score MoE ({len(settings.seeds)} seeds x {settings.replicates} "
        "replicates per n; interval: 95% over seeds)"
    )
    return save_figure(fig, out, "moe_rates.png")


def setup_text(settings: Settings) -> str:
    dense = TRUTH["dense"]
    return f"""
Our reading of the paper's model (its experiment section was not available to us; only abstracts and
summaries were, so this setup is ours): one attention row is a mixture of experts whose gates are
quadratic affinity scores `s_i(x) = xᵀA_i x + c_i` of the input and whose experts are linear values
`η_i·x`; the output is `Σ_i sigmoid(s_i(x)) η_i·x` (sigmoid) or `Σ_i softmax_i(s(x)) η_i·x` (softmax).

* Input dimension d = {DIM}, x ~ Uniform[-1, 1]^{DIM}; k* = 2 true experts, fitted k = {2 + settings.extra_atoms}
  (over-specified); noise N(0, {NOISE}²).
* True parameters, shared by both gates. Dense: A*₁ = {dense.A[0]}, A*₂ = {dense.A[1]}, c* = {dense.c},
  η* = {dense.eta}. Sparse: the same but A*₁ = 0 (the first gate does not depend on the input).
* Least squares over the box |θ| ≤ {BOX} with c_i ≤ 0 (the sigmoid bias is negative, as −log n is; this
  rules out the exact alternative representation sigmoid(s) = 1 − sigmoid(−s), under which the
  over-specified sigmoid model is not identifiable), by projected Levenberg–Marquardt
  ({settings.iterations} iterations), {settings.restarts} restart(s) per data set started at the true atoms plus
  N(0, {INIT_SPREAD}²) noise (the extra atom at a random true atom), keeping the lowest training error. float64,
  all replicates and restarts of one n solved as one batch.
* Sample sizes n = {", ".join(map(str, settings.sample_sizes))}; per seed {settings.replicates} replicates
  (independent data sets) each, {len(settings.seeds)} seeds ({", ".join(map(str, settings.seeds))}). Within a seed
  both gates see the same inputs, noise and restart perturbations, so their slopes are paired by seed. The
  per-seed cost is reduced from the earlier one-seed run (12 replicates × 4 restarts, 646 s) to
  {settings.replicates} × {settings.restarts} so that all seeds fit in about the same time; the seed-to-seed
  spread of the slopes carries the cost of the fewer replicates into the intervals.
* Voronoi loss, with w_i the gate mass (sigmoid(c_i), or softmax(c)_i), u_i = w_i η_i, γ_i the gate
  parameters ((A_i, c_i) for sigmoid; A_i − Σ_l w_l A_l for softmax, which ignores a common shift) and
  cells V_j = {{i : j = argmin_l |γ_i − γ*_l|}}:
  `D = Σ_j |Σ_(i∈V_j) u_i − u*_j| + [softmax] Σ_j |Σ_(i∈V_j) w_i − w*_j| + Σ_j Σ_(i∈V_j) |u_i| |γ_i − γ*_j|^(r_j)`,
  r_j = 1 for a cell of one atom, 2 otherwise. It is zero on every exact representation of the truth.
* Slope per seed: least squares of log D on log n over that seed's replicate-level points. Over seeds: the
  mean, the 95% t-interval and the detectable difference (see the rule and the formula below).
"""


def findings_text(results: dict, parts: list[Judgement]) -> str:
    rows = []
    for regime in REGIMES:
        for kind in (*KINDS, "difference"):
            res = results[regime][kind]
            name = "sigmoid − softmax" if kind == "difference" else kind
            per_seed = ", ".join(f"{v:.2f}" for v in res["values"])
            sd = "—" if res["sd"] is None else round(res["sd"], 3)
            rows.append([regime, name, per_seed, round(res["mean"], 3), interval(res), sd])
    table = markdown_table(["regime", "gate", "slope per seed", "mean", "95% CI over seeds", "SD"], rows)
    per_n, fit_check = [], []
    for regime in REGIMES:
        for kind in KINDS:
            res = results[regime][kind]
            per_n.append([regime, kind] + [p["geometric_mean"] for p in res["per_n"]])
            last = res["per_n"][-1]
            fit_check.append([regime, kind, f"{last['train_mse']:.5f} / {last['train_mse_at_truth']:.5f}"])
    sizes = [str(p["n"]) for p in results["dense"]["sigmoid"]["per_n"]]
    detail = markdown_table(["regime", "gate", *[f"n={s}" for s in sizes]], per_n)
    return (
        "Slopes of log Voronoi loss on log n, one per seed, and their paired differences:\n\n"
        + table
        + "\n\nThe verdict's statistics (dense regime):\n\n"
        + judgements_markdown(parts)
        + "\n\nGeometric mean of the Voronoi loss over all seeds' replicates, per sample size:\n\n"
        + detail
        + "\n\nTraining MSE against the MSE of the true parameters at the largest n (mean over seeds):\n\n"
        + markdown_table(["regime", "gate", "train MSE / MSE at truth"], fit_check)
        + "\n\nA training MSE at or below the MSE of the true parameters means the optimiser reached the "
        "least-squares fit's level; one far above it would mean an optimisation failure."
    )


def run(size: str, out: Path, log=print) -> Outcome:
    settings = SETTINGS[size]
    results = measure_all(settings, log)
    parts = judgements(slopes_of(results))
    results["judgements"] = [j.to_dict() for j in parts]
    verdict = decide(parts)
    figures = [
        plot(results, settings, out),
        judgements_figure(
            parts, out, "moe_rates_seeds.png", f"moe-rates: the verdict's statistics over {len(settings.seeds)} seeds"
        ),
    ]
    settings_dict = {
        **asdict(settings),
        "dim": DIM,
        "noise": NOISE,
        "box": BOX,
        "init_spread": INIT_SPREAD,
        "near_half": NEAR_HALF,
        "faster_by": FASTER_BY,
        "truth": {r: asdict(t) for r, t in TRUTH.items()},
    }
    return Outcome(results, verdict, settings_dict, setup_text(settings), findings_text(results, parts), figures)
