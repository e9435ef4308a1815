"""length-extrapolation: train at one context length, evaluate at 2x, 4x and 8x (arXiv 2409.04431's setting).

Four GPTs, RoPE or ALiBi times sigmoid or softmax attention, trained at context L with the sigmoid bias
fixed at -log L (the model keeps that constant at every evaluation length), then evaluated on the same
held-out windows at L, 2L, 4L and 8L. The loss ratio loss(8L) / loss(L) measures the degradation: 1 means
the model extrapolates perfectly (on the generated corpus, whose next character depends only on the last
word or two, a model that extrapolates should keep its loss).

Tested hypothesis (ours, stated before measuring): with b fixed at -log L, sigmoid attention extrapolates as
well as softmax attention with the same position encoding, and ALiBi extrapolates better than RoPE.

Each model is trained once per seed; each part of the hypothesis is a per-seed difference of ratios judged by
its 95% interval over the seeds (``common.judge``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..models import GPTConfig
from ..plotting import label_log_ticks, pyplot
from .common import (
    COLORS,
    Claim,
    Judgement,
    Outcome,
    Verdict,
    combine,
    judge,
    judgements_figure,
    judgements_markdown,
    judgements_text,
    markdown_table,
    save_figure,
)
from .lm import TrainRecipe, corpus_data, run_config, train_run

POSITIONS = ("rope", "alibi")
KINDS = ("sigmoid", "softmax")
FACTORS = (1, 2, 4, 8)
RATIO_MARGIN = 0.02  # sigmoid's loss ratio at 8L may exceed softmax's by at most this (absolute)


@dataclass(frozen=True)
class Settings:
    corpus: str
    corpus_chars: int
    d_model: int
    n_head: int
    n_layer: int
    train_length: int
    recipe: TrainRecipe
    seeds: tuple[int, ...]  # each model is trained once per seed (train.seed: initialisation and batches)


SETTINGS = {
    "test": Settings("synthetic", 60_000, 32, 2, 1, 16, TrainRecipe(12, 8, 3e-3, 2, 4, device="cpu"), (0, 1)),
    "quick": Settings("synthetic", 300_000, 64, 4, 2, 32, TrainRecipe(300, 16, 3e-3, 30, 16, device="cpu"), (0, 1, 2)),
    "full": Settings(
        "shakespeare", 0, 64, 4, 2, 64, TrainRecipe(1500, 16, 3e-3, 75, 64, device="cpu"), (0, 1, 2, 3, 4)
    ),
}


def judgements(ratios: dict) -> list[Judgement]:
    """The hypothesis's parts over seeds; ``ratios[pos][kind]``: loss(8L) / loss(L) per seed. Sigmoid
    extrapolates as well as softmax: ratio(sigmoid) - ratio(softmax) below RATIO_MARGIN, per position
    encoding; ALiBi better than RoPE: ratio(ALiBi) - ratio(RoPE) below 0, per attention."""

    def difference(a: list[float], b: list[float]) -> list[float]:
        return [x - y for x, y in zip(a, b, strict=True)]

    parts = [
        judge(
            difference(ratios[pos]["sigmoid"], ratios[pos]["softmax"]),
            Claim(f"ratio(sigmoid) − ratio(softmax), {pos}", high=RATIO_MARGIN),
        )
        for pos in POSITIONS
    ]
    parts += [
        judge(
            difference(ratios["alibi"][kind], ratios["rope"][kind]),
            Claim(f"ratio(ALiBi) − ratio(RoPE), {kind}", high=0.0),
        )
        for kind in KINDS
    ]
    return parts


def decide(parts: list[Judgement]) -> Verdict:
    rule = (
        "per seed, the loss ratio loss(8L)/loss(L) of each model; supports iff, by the 95% interval over seeds, "
        f"ratio(sigmoid) − ratio(softmax) lies below {RATIO_MARGIN} for each position encoding and ratio(ALiBi) − "
        "ratio(RoPE) below 0 for each attention; does not support if any part's interval lies entirely on the "
        "other side; else inconclusive (an interval that straddles the bound)."
    )
    return Verdict(combine(parts), rule, judgements_text(parts) + ".")


def plot(losses: dict, settings: Settings, out: Path) -> str:
    """Loss against evaluation length: colour = attention, line style and marker = position encoding (solid
    circles RoPE, dashed hollow squares ALiBi), so the four legend entries differ at a glance."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lengths = [f * settings.train_length for f in FACTORS]
    looks = {
        "rope": {"linestyle": "-", "marker": "o"},
        "alibi": {"linestyle": "--", "marker": "s", "markerfacecolor": "none"},
    }
    for pos in POSITIONS:
        for kind in KINDS:
            ax.plot(
                lengths,
                [losses[pos][kind][str(n)] for n in lengths],
                color=COLORS[kind],
                markersize=6,
                markeredgewidth=1.5,
                label=f"{kind} + {pos}",
                **looks[pos],
            )
    ax.axvline(settings.train_length, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    label_log_ticks(ax.xaxis, lengths)
    ax.set_xlabel("evaluation context length (training: dotted line)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Length extrapolation")
    ax.legend(fontsize=8, handlelength=3.5)
    return save_figure(fig, out, "length_extrapolation.png")


def run(size: str, out: Path, log=print) -> Outcome:
    settings = SETTINGS[size]
    data, corpus = corpus_data(settings.corpus, out, settings.corpus_chars)
    length = settings.train_length
    eval_lengths = tuple(f * length for f in FACTORS[1:])
    per_seed = {pos: {kind: [] for kind in KINDS} for pos in POSITIONS}  # each seed's loss by context
    for seed in settings.seeds:
        recipe = replace(settings.recipe, seed=seed)
        for pos in POSITIONS:
            for kind in KINDS:
                model = GPTConfig(
                    d_model=settings.d_model,
                    n_head=settings.n_head,
                    n_layer=settings.n_layer,
                    block_size=length,
                    attn=kind,
                    pos=pos,
                    qk_norm="layernorm",
                )
                folder = out / "runs" / f"{kind}-{pos}-seed{seed}"
                losses = train_run(run_config(model, data, recipe, eval_lengths), folder)["val_loss_by_context"]
                per_seed[pos][kind].append(losses)
                log(
                    f"  length-extrapolation {kind}+{pos} seed {seed}: "
                    + ", ".join(f"{n}: {v:.3f}" for n, v in losses.items())
                )
    lengths = [str(f * length) for f in FACTORS]
    losses = {
        pos: {kind: {n: sum(s[n] for s in runs) / len(runs) for n in lengths} for kind, runs in kinds.items()}
        for pos, kinds in per_seed.items()
    }
    ratios = {
        pos: {kind: [s[str(8 * length)] / s[str(length)] for s in runs] for kind, runs in kinds.items()}
        for pos, kinds in per_seed.items()
    }
    parts = judgements(ratios)
    verdict = decide(parts)
    figures = [
        plot(losses, settings, out),
        judgements_figure(
            parts,
            out,
            "length_extrapolation_seeds.png",
            f"length-extrapolation: the verdict's statistics over {len(settings.seeds)} seeds",
        ),
    ]
    r = settings.recipe
    setup = f"""
* Model: GPT (`sigattn.models`), {settings.n_layer} layers, d_model {settings.d_model}, {settings.n_head} heads,
  QK-norm, pre-norm, trained at context L = {length} with `sigattn.train` (AdamW, lr {r.lr:g}, {r.warmup_steps} warmup
  steps then cosine to lr/10, batch {r.batch_size}, {r.steps} steps) on {corpus}; character tokens.
* Position encodings: RoPE (base 10000) or ALiBi (the standard head slopes). Sigmoid bias fixed at
  −log L = −log {length} at every evaluation length.
* Evaluation: {r.eval_windows} fixed windows spread over the held-out 10% of the text, at L, 2L, 4L, 8L.
* {len(settings.seeds)} seeds ({", ".join(map(str, settings.seeds))}): each model trained once per seed (its
  initialisation and batches); the differences are paired by seed and judged by their 95% interval over seeds.
"""
    rows = []
    for pos in POSITIONS:
        for kind in KINDS:
            at_lengths = [round(losses[pos][kind][n], 4) for n in lengths]
            each = ", ".join(f"{v:.3f}" for v in ratios[pos][kind])
            rows.append([f"{kind} + {pos}", *at_lengths, each])
    findings = (
        "Loss at each evaluation length, mean over seeds, and each seed's loss(8L)/loss(L):\n\n"
        + markdown_table(
            ["model", *[f"loss at {f}L = {f * length}" for f in FACTORS], "loss(8L)/loss(L) per seed"], rows
        )
        + "\n\nThe verdict's statistics:\n\n"
        + judgements_markdown(parts)
    )
    results = {
        "val_loss_by_context": losses,
        "val_loss_by_context_per_seed": per_seed,
        "loss_ratio_8x": ratios,
        "train_length": length,
        "judgements": [j.to_dict() for j in parts],
    }
    return Outcome(results, verdict, asdict(settings), setup, findings, figures)
