"""bias-ablation: what keeps sigmoid attention stable in training (arXiv 2409.04431).

The paper's explanation of instability: at initialisation the sigmoid weights are about sigmoid(b) each,
so a row of n keys adds up about n * sigmoid(b) value vectors; with b = 0 the attention output's norm grows
with n, with b = -log n it stays O(1). Its remedies: b = -log n, and norms that bound what attention
writes into the residual stream (QK-norm, LayerScale, hybrid-norm).

Two measurements:

* the attention-output norm at initialisation against the sequence length, for b = 0, b = -log n and
  softmax (a fresh model per length; no training);
* the same small GPT trained with b = -log n, b = 0 and a learnable per-head b (initialised at -log n), in
  three settings: plain pre-norm, with QK-norm, and with QK-norm + hybrid-norm + LayerScale; plus softmax
  for reference. Per run: the loss curve, the gradient norm of every step, the gradient-norm spikes
  (``sigattn.train.diagnostics.SpikeDetector``: above 3x the running average) and the attention-output
  norm at initialisation.

Sizes: ``test``, ``quick`` and ``full`` are small character models on a CPU (one seed); ``gpu`` asks the
question at the scale of the paper's language models on one GPU: GPT-2 small's shape (12 layers, width 768,
12 heads of 64, context 1024; 110M parameters) on the environment's Python source with a BPE, each run short
(250 steps of 16k tokens) and repeated over two seeds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..models import GPT, GPTConfig
from ..plotting import pyplot
from ..train.diagnostics import attention_stats
from ..train.trainer import resolve_device
from .common import Outcome, Verdict, fit_power_law, markdown_table, save_figure
from .lm import TrainRecipe, corpus_data, run_config, train_run

BIASES = {
    "b=-log n": {"attn_bias": "fixed", "bias_init": None},
    "b=0": {"attn_bias": "fixed", "bias_init": 0.0},
    "learnable b": {"attn_bias": "learnable", "bias_init": None},
}
STABILISERS = {
    "plain": {"qk_norm": "none", "norm_style": "pre", "layerscale": None},
    "qk-norm": {"qk_norm": "layernorm", "norm_style": "pre", "layerscale": None},
    "qk-norm+hybrid+layerscale": {"qk_norm": "layernorm", "norm_style": "hybrid", "layerscale": 0.1},
}
GROWS, FLAT = 0.25, 0.1  # init-norm slopes (log-log vs n): b=0 must exceed GROWS, b=-log n stay below FLAT
LOSS_TOLERANCE = 1.02  # b=-log n's final loss may be at most 2% above b=0's


@dataclass(frozen=True)
class Settings:
    corpus: str  # "synthetic", "shakespeare" or "pycode" (lm.corpus_data)
    corpus_chars: int  # synthetic: its size; pycode: at most this many bytes of source (0: all)
    d_model: int
    n_head: int
    n_layer: int
    block_size: int
    recipe: TrainRecipe
    init_lengths: tuple[int, ...]  # sequence lengths for the attention-output norm at initialisation
    seeds: tuple[int, ...] = (0,)  # every training run is repeated with each (train.seed)


SETTINGS = {
    "test": Settings(
        "synthetic", 60_000, 32, 2, 1, 32, TrainRecipe(12, 8, 3e-3, 2, 4, device="cpu"), (16, 64, 128), seeds=(0, 1)
    ),
    "quick": Settings(
        "synthetic", 300_000, 64, 4, 2, 64, TrainRecipe(150, 16, 3e-3, 15, 16, device="cpu"), (16, 64, 256, 1024)
    ),
    "full": Settings(
        "shakespeare",
        0,
        64,
        4,
        2,
        128,
        TrainRecipe(1000, 16, 3e-3, 50, 64, device="cpu"),
        (16, 64, 256, 1024, 4096),
        seeds=(0, 1),
    ),
    # Eager (compile off): compiling each of the 20 models would take longer than its 250 steps. The lengths
    # stop at 4096: the sparsity probe materialises a layer's attention weights (1.6 GB at 4096).
    "gpu": Settings(
        "pycode",
        0,
        768,
        12,
        12,
        1024,
        TrainRecipe(250, 16, 1e-3, 50, 32, device="cuda", compile="off"),
        (256, 1024, 4096),
        seeds=(0, 1),
    ),
}


def model_config(settings: Settings, attn: str, bias: dict, stabiliser: dict, block_size: int | None = None):
    return GPTConfig(
        d_model=settings.d_model,
        n_head=settings.n_head,
        n_layer=settings.n_layer,
        block_size=block_size or settings.block_size,
        attn=attn,
        pos="rope",
        **bias,
        **stabiliser,
    )


@torch.no_grad()
def init_norms(settings: Settings, attn: str, bias: dict, vocab: int = 64, seed: int = 0) -> list[float]:
    """The attention-output norm at initialisation (mean over layers) of a plain model built for each
    length n (so b = -log n is -log of that n), on random tokens, in float32 on the recipe's device."""
    device = resolve_device(settings.recipe.device)  # a TrainError, before any work, where CUDA is missing
    norms = []
    for n in settings.init_lengths:
        torch.manual_seed(seed)
        model = GPT(replace(model_config(settings, attn, bias, STABILISERS["plain"], n), vocab_size=vocab))
        tokens = torch.randint(vocab, (2, n), generator=torch.Generator().manual_seed(seed))
        per_layer = attention_stats(model.to(device), tokens.to(device))["attn_out_norm"]
        norms.append(sum(per_layer) / len(per_layer))
    return norms


def run_summary(run: dict) -> dict:
    tail = max(1, len(run["train_loss"]) // 10)
    return {
        "final_train_loss": sum(run["train_loss"][-tail:]) / tail,  # mean of the last 10% of steps
        "final_val_loss": run["final_val_loss"],
        "grad_spikes": run["grad_spikes"],
        "max_grad_norm": max(run["grad_norm"]),
        "init_attn_out_norm": sum(run["init_attn_out_norm"]) / len(run["init_attn_out_norm"]),
    }


def seeds_summary(seeds: tuple[int, ...], per_seed: list[dict]) -> dict:
    """A variant over its seeds: the losses and the norm at initialisation averaged, the spikes summed, the
    largest gradient norm; each seed's own summary under ``per_seed``."""

    def mean(key: str) -> float:
        return sum(summary[key] for summary in per_seed) / len(per_seed)

    return {
        "final_train_loss": mean("final_train_loss"),
        "final_val_loss": mean("final_val_loss"),
        "grad_spikes": sum(summary["grad_spikes"] for summary in per_seed),
        "max_grad_norm": max(summary["max_grad_norm"] for summary in per_seed),
        "init_attn_out_norm": mean("init_attn_out_norm"),
        "per_seed": [{"seed": seed, **summary} for seed, summary in zip(seeds, per_seed, strict=True)],
    }


def decide(init: dict, runs: dict, seeds: int = 1) -> Verdict:
    grow = init["b=0"]["slope"]
    flat = init["b=-log n"]["slope"]
    norm_ok = grow > GROWS and flat < FLAT
    train_ok, notes = True, []
    for stab in STABILISERS:
        a, b = runs[f"b=-log n / {stab}"], runs[f"b=0 / {stab}"]
        ok = a["grad_spikes"] <= b["grad_spikes"] and a["final_train_loss"] <= LOSS_TOLERANCE * b["final_train_loss"]
        train_ok &= ok
        notes.append(
            f"{stab}: -log n {a['grad_spikes']} spikes, loss {a['final_train_loss']:.3f} vs b=0 "
            f"{b['grad_spikes']} spikes, loss {b['final_train_loss']:.3f}"
        )
    over = f" over {seeds} seeds (spikes summed, losses averaged)" if seeds > 1 else ""
    rule = (
        f"supports iff (a) at initialisation the attention-output norm grows with n for b=0 (log-log slope > "
        f"{GROWS}) but not for b=-log n (slope < {FLAT}), and (b) in every stabiliser setting b=-log n has no "
        f"more gradient-norm spikes than b=0 and a final training loss (mean of the last 10% of steps) at most "
        f"{LOSS_TOLERANCE:g}x b=0's{over}."
    )
    predicted = "as predicted" if norm_ok else "not as predicted"
    summary = f"init norm slope vs n: b=0 {grow:.2f}, b=-log n {flat:.2f} ({predicted}); " + "; ".join(notes) + "."
    return Verdict(norm_ok and train_ok, rule, summary)


# Colour, line style and width per variant: the curves overlap (a learnable b barely leaves -log n), so a
# wide dotted line lets the one under it show through its gaps.
STYLES = {
    "b=-log n": {"color": "tab:blue", "linestyle": "-", "lw": 1.2},
    "b=0": {"color": "tab:red", "linestyle": "--", "lw": 1.4},
    "learnable b": {"color": "tab:green", "linestyle": ":", "lw": 2.4},
    "softmax": {"color": "tab:orange", "linestyle": "-.", "lw": 1.4},
}


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_training(runs: dict, out: Path) -> str:
    """Per stabiliser: the training loss (a running mean, so that the variants' curves do not hide each other
    under per-step noise) and the per-step gradient norm (raw, half transparent: the spikes are the point).
    ``runs`` maps each variant to its runs, one per seed; the seeds after the first are drawn fainter."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(STABILISERS), figsize=(13, 6.5), sharex=True)
    steps_total = max(len(run["train_loss"]) for seeds in runs.values() for run in seeds)
    window = max(1, steps_total // 50)
    for col, stab in enumerate(STABILISERS):
        for name, seeds in runs.items():
            variant, setting = name.split(" / ")
            if setting != stab:
                continue
            for k, run in enumerate(seeds):
                label, fade = (variant, 1.0) if k == 0 else (None, 0.5)
                steps = range(1, len(run["train_loss"]) + 1)
                style = {**STYLES[variant], "alpha": fade}
                axes[0, col].plot(steps, running_mean(run["train_loss"], window), label=label, **style)
                axes[1, col].plot(
                    steps, run["grad_norm"], color=STYLES[variant]["color"], lw=0.8, alpha=0.55 * fade, label=label
                )
        axes[0, col].set_title(stab)
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("step")
        axes[0, col].set_ylabel(f"training loss (mean of {window} steps)" if window > 1 else "training loss")
        axes[1, col].set_ylabel("gradient norm (before clipping)")
        axes[0, col].legend(fontsize=8)
        axes[1, col].legend(fontsize=8)
    return save_figure(fig, out, "bias_ablation_training.png")


def plot_init(init: dict, lengths: tuple[int, ...], out: Path) -> str:
    """The norms at initialisation and the power laws fitted to them (dashed), whose slopes the verdict reads."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for (name, res), marker in zip(init.items(), ("o", "s", "^"), strict=False):
        color = STYLES[name]["color"]
        ax.plot(lengths, res["norms"], marker, color=color, markerfacecolor="none", markeredgewidth=1.5, label=name)
        fitted = [math.exp(res["intercept"]) * n ** res["slope"] for n in lengths]
        ax.plot(lengths, fitted, "--", color=color, lw=1, label=f"{name} fit: n^{res['slope']:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("attention-output norm at init")
    ax.set_title("Attention-output norm at initialisation")
    ax.legend(fontsize=8)
    return save_figure(fig, out, "bias_ablation_init_norms.png")


def run(size: str, out: Path, log=print) -> Outcome:
    settings = SETTINGS[size]
    init = {}
    for name, attn, bias in (
        ("b=0", "sigmoid", BIASES["b=0"]),
        ("b=-log n", "sigmoid", BIASES["b=-log n"]),
        ("softmax", "softmax", BIASES["b=-log n"]),
    ):
        norms = init_norms(settings, attn, bias)
        fit = fit_power_law(list(settings.init_lengths), norms)
        init[name] = {"norms": norms, "slope": fit.slope, "intercept": fit.intercept}
        log(f"  bias-ablation init norms {name}: {', '.join(f'{v:.3g}' for v in norms)}")

    data, corpus = corpus_data(settings.corpus, out, settings.corpus_chars)
    variants = [(f"{b} / {s}", "sigmoid", BIASES[b], STABILISERS[s]) for s in STABILISERS for b in BIASES]
    variants.append(("softmax / plain", "softmax", BIASES["b=-log n"], STABILISERS["plain"]))
    runs, curves = {}, {}
    for name, attn, bias, stab in variants:
        folder = name.replace(" / ", "_").replace(" ", "").replace("=", "")
        curves[name], summaries = [], []
        for seed in settings.seeds:
            config = run_config(model_config(settings, attn, bias, stab), data, replace(settings.recipe, seed=seed))
            curves[name].append(train_run(config, out / "runs" / f"{folder}_seed{seed}"))
            summaries.append(run_summary(curves[name][-1]))
            loss, spikes = summaries[-1]["final_train_loss"], summaries[-1]["grad_spikes"]
            log(f"  bias-ablation {name} seed {seed}: loss {loss:.3f}, spikes {spikes}")
        runs[name] = seeds_summary(settings.seeds, summaries)
    verdict = decide(init, runs, len(settings.seeds))
    figures = [plot_init(init, settings.init_lengths, out), plot_training(curves, out)]

    r = settings.recipe
    seeds = settings.seeds
    tokens = "BPE tokens" if settings.corpus == "pycode" else "character tokens"
    where = "on one GPU, bf16 autocast, eager (no compile)" if r.device == "cuda" else f"on the CPU ({r.device} recipe)"
    repeats = (
        f"Each run repeated with seeds {', '.join(map(str, seeds))} (initialisation and batches): spikes are summed "
        "and losses averaged over the seeds; the per-seed values are listed, their spread is the noise to read a "
        "difference against."
        if len(seeds) > 1
        else "One training run per variant (no seed-to-seed spread measured): a difference of one or two spikes, "
        "or of a percent of loss, may be noise."
    )
    setup = f"""
* Model: GPT (`sigattn.models`), {settings.n_layer} layers, d_model {settings.d_model}, {settings.n_head} heads, RoPE,
  GELU MLP, trained at context n = {settings.block_size} with `sigattn.train` (AdamW, lr {r.lr:g} with {r.warmup_steps}
  warmup steps then cosine to lr/10, weight decay 0.1, gradient clipping at 1.0, batch {r.batch_size},
  {r.steps} steps, seed{"s" if len(seeds) > 1 else ""} {", ".join(map(str, seeds))}) {where} on {corpus}; {tokens}.
* Biases: b = −log n (fixed), b = 0 (fixed), learnable per-head b initialised at −log n. Settings: plain pre-norm;
  QK-norm (LayerNorm on each head's q and k); QK-norm + hybrid-norm (a norm on the attention output) +
  LayerScale (init 0.1). Softmax with plain pre-norm for reference.
* Gradient-norm spike: a step whose global gradient norm (before clipping) exceeds 3x the running average of
  the earlier ones (`SpikeDetector`, after 20 warm-up steps). {repeats}
* Attention-output norm: the mean over tokens of the L2 norm of the attention output before the output
  projection (all heads), averaged over layers; against length: plain models built for n =
  {", ".join(map(str, settings.init_lengths))} (so b = −log n follows n), random tokens, no training.
"""
    init_rows = [[name, *[round(v, 4) for v in res["norms"]], round(res["slope"], 3)] for name, res in init.items()]
    header = ["run", "final train loss", "val loss", "grad-norm spikes", "max grad norm", "attn-out norm at init"]
    if len(seeds) > 1:
        header += ["train loss per seed", "spikes per seed"]
    run_rows = []
    for name, summary in runs.items():
        row = [name, *(summary[key] for key in ("final_train_loss", "final_val_loss", "grad_spikes"))]
        row += [summary["max_grad_norm"], summary["init_attn_out_norm"]]
        if len(seeds) > 1:
            row.append(", ".join(f"{seed['final_train_loss']:.4f}" for seed in summary["per_seed"]))
            row.append(", ".join(str(seed["grad_spikes"]) for seed in summary["per_seed"]))
        run_rows.append(row)
    findings = (
        "Attention-output norm at initialisation against the sequence length:\n\n"
        + markdown_table(["variant", *[f"n={n}" for n in settings.init_lengths], "log-log slope"], init_rows)
        + "\n\nTraining runs"
        + (f" (over seeds {', '.join(map(str, seeds))}: losses averaged, spikes summed)" if len(seeds) > 1 else "")
        + ":\n\n"
        + markdown_table(header, run_rows)
    )
    results = {"init_norms": init, "runs": runs, "lengths": list(settings.init_lengths)}
    return Outcome(results, verdict, asdict(settings), setup, findings, figures)
