"""length-extrapolation: train at one context length, evaluate at 2x, 4x and 8x (arXiv 2409.04431's setting).

Four GPTs, RoPE or ALiBi times sigmoid or softmax attention, trained at context L with the sigmoid bias
fixed at -log L (the model keeps that constant at every evaluation length), then evaluated on the same
held-out windows at L, 2L, 4L and 8L. The loss ratio loss(8L) / loss(L) measures the degradation: 1 means
the model extrapolates perfectly (on the generated corpus, whose next character depends only on the last
word or two, a model that extrapolates should keep its loss).

Tested hypothesis (ours, stated before measuring): with b fixed at -log L, sigmoid attention extrapolates as
well as softmax attention with the same position encoding, and ALiBi extrapolates better than RoPE.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..models import GPTConfig
from ..plotting import label_log_ticks, pyplot
from .common import COLORS, Outcome, Verdict, markdown_table, save_figure
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


SETTINGS = {
    "test": Settings("synthetic", 60_000, 32, 2, 1, 16, TrainRecipe(12, 8, 3e-3, 2, 4, device="cpu")),
    "quick": Settings("synthetic", 300_000, 64, 4, 2, 32, TrainRecipe(300, 16, 3e-3, 30, 16, device="cpu")),
    "full": Settings("shakespeare", 0, 64, 4, 2, 64, TrainRecipe(1500, 16, 3e-3, 75, 64, device="cpu")),
}


def decide(ratios: dict) -> Verdict:
    """ratios[pos][kind]: loss(8L) / loss(L)."""
    parity = {pos: ratios[pos]["sigmoid"] <= ratios[pos]["softmax"] + RATIO_MARGIN for pos in POSITIONS}
    alibi_better = {kind: ratios["alibi"][kind] < ratios["rope"][kind] for kind in KINDS}
    rule = (
        f"supports iff, for each position encoding, sigmoid's loss ratio loss(8L)/loss(L) is at most softmax's "
        f"+ {RATIO_MARGIN}, and, for each attention, ALiBi's ratio is below RoPE's."
    )
    parts = [
        f"{pos}: sigmoid {ratios[pos]['sigmoid']:.3f} vs softmax {ratios[pos]['softmax']:.3f} "
        f"({'as well' if parity[pos] else 'worse'})"
        for pos in POSITIONS
    ]
    parts += [
        f"{kind}: ALiBi {ratios['alibi'][kind]:.3f} vs RoPE {ratios['rope'][kind]:.3f} "
        f"({'better' if alibi_better[kind] else 'not better'})"
        for kind in KINDS
    ]
    return Verdict(
        all(parity.values()) and all(alibi_better.values()), rule, "loss(8L)/loss(L): " + "; ".join(parts) + "."
    )


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
    losses, ratios = {pos: {} for pos in POSITIONS}, {pos: {} for pos in POSITIONS}
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
            run_result = train_run(
                run_config(model, data, settings.recipe, eval_lengths), out / "runs" / f"{kind}-{pos}"
            )
            losses[pos][kind] = run_result["val_loss_by_context"]
            ratios[pos][kind] = losses[pos][kind][str(8 * length)] / losses[pos][kind][str(length)]
            log(
                f"  length-extrapolation {kind}+{pos}: "
                + ", ".join(f"{n}: {v:.3f}" for n, v in losses[pos][kind].items())
            )
    verdict = decide(ratios)
    figure = plot(losses, settings, out)
    r = settings.recipe
    setup = f"""
* Model: GPT (`sigattn.models`), {settings.n_layer} layers, d_model {settings.d_model}, {settings.n_head} heads,
  QK-norm, pre-norm, trained at context L = {length} with `sigattn.train` (AdamW, lr {r.lr:g}, {r.warmup_steps} warmup
  steps then cosine to lr/10, batch {r.batch_size}, {r.steps} steps, seed {r.seed}) on {corpus}; character tokens.
* Position encodings: RoPE (base 10000) or ALiBi (the standard head slopes). Sigmoid bias fixed at
  −log L = −log {length} at every evaluation length.
* Evaluation: {r.eval_windows} fixed windows spread over the held-out 10% of the text, at L, 2L, 4L, 8L. One
  training run per model (no seed-to-seed spread measured): small differences between ratios are not evidence.
"""
    rows = []
    for pos in POSITIONS:
        for kind in KINDS:
            at_lengths = [round(losses[pos][kind][str(f * length)], 4) for f in FACTORS]
            rows.append([f"{kind} + {pos}", *at_lengths, round(ratios[pos][kind], 4)])
    findings = markdown_table(["model", *[f"loss at {f}L = {f * length}" for f in FACTORS], "loss(8L)/loss(L)"], rows)
    results = {"val_loss_by_context": losses, "loss_ratio_8x": ratios, "train_length": length}
    return Outcome(results, verdict, asdict(settings), setup, findings, [figure])
