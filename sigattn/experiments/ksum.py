"""ksum: sum the values of the k tokens that match a query — does softmax's competition hurt as k grows?

Each sequence holds S context tokens, each a (key, value) pair with keys in {0..K-1} and values in
{0..V-1}, then one query token carrying a key. Exactly k context tokens carry the query's key; the target
is the sum of their values. k varies from sequence to sequence (uniform in 1..k_max), so the model cannot
know it in advance.

Sigmoid attention can weigh every matching token by about 1 and every other one by about 0, so its output
is the sum itself. Softmax weights sum to 1: matching tokens share the mass (1/k each), so the output is
their mean, and turning it into the sum needs k, which softmax has to infer by other means. The paper's
intuition (arXiv 2502.00281: token competition) predicts that softmax's accuracy falls behind as k grows.

Model: value, key and role embeddings (no positions: the task is a set function), ``n_layer`` bidirectional
``sigattn.nn.TransformerBlock``s with sigmoid (b = -log(S + 1)) or softmax attention, a final LayerNorm and
a linear readout of the query token, trained with the squared error on target / scale. A prediction is
correct when it rounds to the target.

Each seed trains one model per attention (same seed: same training and evaluation batches, so the comparison
is paired); its statistic is the least-squares slope against k of its accuracy gap (sigmoid - softmax). The
verdict reads the mean over seeds with its 95% t-interval (``common.judge``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..nn import BlockConfig, TransformerBlock
from ..plotting import pyplot
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
QUERY, CONTEXT = 1, 0  # roles
# The claimed effect's size, our choice (the paper states none): a gap that grows by 0.10 in accuracy from k = 1
# to k = k_max, i.e. a slope of 0.10 / (k_max - 1) per unit of k.
GAP_GROWTH = 0.10


@dataclass(frozen=True)
class Settings:
    seqlen: int  # context tokens S (the query comes on top)
    k_max: int
    num_keys: int
    num_values: int
    d_model: int
    n_head: int
    n_layer: int
    steps: int
    batch_size: int
    lr: float
    eval_per_k: int
    seeds: tuple[int, ...]


# full: the earlier three-seed run's per-seed settings; one seed's two models take ~95 s on the 2-core
# development CPU, so 6 seeds ~10 min.
SETTINGS = {
    "test": Settings(8, 3, 4, 4, 32, 2, 1, 30, 32, 3e-3, 64, (0, 1)),
    "quick": Settings(16, 8, 8, 4, 64, 4, 2, 600, 64, 2e-3, 400, (0, 1, 2)),
    "full": Settings(32, 16, 16, 4, 64, 4, 2, 1500, 64, 2e-3, 1000, tuple(range(6))),
}


@dataclass
class KSumBatch:
    keys: Tensor  # (B, S + 1) int64; the last token is the query
    values: Tensor  # (B, S + 1) int64; the query's value slot holds num_values (a "no value" index)
    roles: Tensor  # (B, S + 1) int64: CONTEXT or QUERY
    target: Tensor  # (B,) the sum of the values of the context tokens whose key is the query's
    k: Tensor  # (B,) how many context tokens match


def ksum_batch(batch: int, settings: Settings, k: Tensor | int, generator: torch.Generator) -> KSumBatch:
    """A batch of the task; ``k`` is one count for every row or a (B,) tensor of counts (1 <= k <= S)."""
    seqlen, num_keys, num_values = settings.seqlen, settings.num_keys, settings.num_values
    k = torch.full((batch,), k, dtype=torch.int64) if isinstance(k, int) else k
    if bool((k < 1).any()) or bool((k > seqlen).any()):
        raise ValueError(f"k must be in [1, {seqlen}], got {k.tolist()}")
    query_key = torch.randint(num_keys, (batch,), generator=generator)  # [B]
    rank = torch.rand(batch, seqlen, generator=generator).argsort(dim=1).argsort(dim=1)  # [B, S] a permutation
    match = rank < k[:, None]  # [B, S]: exactly k True per row, at random positions
    other = (query_key[:, None] + 1 + torch.randint(num_keys - 1, (batch, seqlen), generator=generator)) % num_keys
    context_keys = torch.where(match, query_key[:, None], other)  # [B, S]
    context_values = torch.randint(num_values, (batch, seqlen), generator=generator)  # [B, S]
    target = (context_values * match).sum(dim=1)  # [B]
    keys = torch.cat([context_keys, query_key[:, None]], dim=1)  # [B, S + 1]
    values = torch.cat([context_values, torch.full((batch, 1), num_values)], dim=1)
    roles = torch.cat([torch.full((batch, seqlen), CONTEXT), torch.full((batch, 1), QUERY)], dim=1)
    return KSumBatch(keys, values, roles, target, k)


class KSumModel(nn.Module):
    def __init__(self, settings: Settings, attn: str):
        super().__init__()
        d = settings.d_model
        self.keys = nn.Embedding(settings.num_keys, d)
        self.values = nn.Embedding(settings.num_values + 1, d)
        self.roles = nn.Embedding(2, d)
        config = BlockConfig(d_model=d, n_head=settings.n_head, attn=attn, pos="none")
        self.blocks = nn.ModuleList(
            TransformerBlock(config, settings.seqlen + 1, causal=False) for _ in range(settings.n_layer)
        )
        self.norm = nn.LayerNorm(d)
        self.readout = nn.Linear(d, 1)

    def forward(self, batch: KSumBatch) -> Tensor:
        """The prediction for the query token, (B,) (in units of the target / scale)."""
        x = self.keys(batch.keys) + self.values(batch.values) + self.roles(batch.roles)  # [B, S + 1, C]
        for block in self.blocks:
            x = block(x)
        return self.readout(self.norm(x[:, -1]))[:, 0]


def target_scale(settings: Settings) -> float:
    """The mean target at the largest k: predictions are regressed on target / scale."""
    return (settings.num_values - 1) / 2 * settings.k_max


def train_model(settings: Settings, attn: str, seed: int) -> KSumModel:
    torch.manual_seed(seed)
    model = KSumModel(settings, attn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    scale = target_scale(settings)
    for _ in range(settings.steps):
        k = torch.randint(1, settings.k_max + 1, (settings.batch_size,), generator=generator)
        batch = ksum_batch(settings.batch_size, settings, k, generator)
        loss = (model(batch) - batch.target / scale).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model


@torch.no_grad()
def accuracy_by_k(model: KSumModel, settings: Settings, seed: int) -> list[float]:
    """The share of exactly right (rounded) sums for each k = 1..k_max, on fresh held-out batches."""
    model.eval()
    generator = torch.Generator().manual_seed(10_000 + seed)
    scale = target_scale(settings)
    accuracy = []
    for k in range(1, settings.k_max + 1):
        batch = ksum_batch(settings.eval_per_k, settings, k, generator)
        predicted = (model(batch) * scale).round()
        accuracy.append((predicted == batch.target).double().mean().item())
    return accuracy


def gaps(accuracy: dict) -> list[float]:
    """The accuracy gap (sigmoid - softmax) at each k = 1..k_max, from {kind: accuracies per k}."""
    return [a - b for a, b in zip(accuracy["sigmoid"], accuracy["softmax"], strict=True)]


def gap_slope(accuracy: dict) -> float:
    """The least-squares slope of the gap against k: > 0 where softmax falls further behind as k grows."""
    gap = gaps(accuracy)
    return fit_line(list(range(1, len(gap) + 1)), gap).slope


def claimed_effect(settings: Settings) -> float:
    return GAP_GROWTH / (settings.k_max - 1)


def judgements(per_seed: dict, settings: Settings) -> list[Judgement]:
    """The claim over seeds: the gap's slope against k is positive (at least ``claimed_effect`` to count as the
    claimed effect); ``per_seed`` maps each attention to its per-seed accuracies per k."""
    slopes = [
        gap_slope(dict(zip(KINDS, pair, strict=True))) for pair in zip(*(per_seed[k] for k in KINDS), strict=True)
    ]
    claim = Claim("slope of the gap (sigmoid − softmax) per unit of k", low=0.0, effect=claimed_effect(settings))
    return [judge(slopes, claim)]


def decide(parts: list[Judgement], settings: Settings) -> Verdict:
    rule = (
        "per seed, the accuracy gap (sigmoid − softmax) at each k = 1.."
        f"{settings.k_max} ({settings.eval_per_k} fresh sums per k) is fitted by least squares against k; the "
        "claim (softmax falls further behind as k grows) predicts a positive slope, and a gap that grows by "
        f"{GAP_GROWTH:g} in accuracy over the k range ({claimed_effect(settings):.4g} per unit of k) is the "
        f"claimed effect (our choice of size). Then {SEED_RULE}"
    )
    return Verdict(combine(parts), rule, judgements_text(parts) + ".")


def plot(per_seed: dict, parts: list[Judgement], settings: Settings, out: Path) -> str:
    """Accuracy per k, mean over seeds with its 95% interval (left); each seed's gap, the mean gap and the line
    whose slope is the mean of the per-seed slopes the verdict reads (right)."""
    plt = pyplot()
    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4))
    ks = list(range(1, settings.k_max + 1))
    seeds = len(settings.seeds)
    for kind in KINDS:
        summaries = [summarize_seeds(list(column)) for column in zip(*per_seed[kind], strict=True)]
        means = [s.mean for s in summaries]
        errors = [[0.0 if s.ci95 is None else s.mean - s.ci95[0] for s in summaries]]
        errors.append([0.0 if s.ci95 is None else s.ci95[1] - s.mean for s in summaries])
        ax.errorbar(
            ks,
            means,
            yerr=errors,
            color=COLORS[kind],
            marker=MARKERS[kind],
            linestyle=LINESTYLES[kind],
            markerfacecolor="none",
            capsize=3,
            label=kind,
        )
    ax.set_xlabel("k (tokens whose values are summed)")
    ax.set_ylabel("exact-sum accuracy (mean, 95% interval over seeds)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"k-sum over {settings.seqlen} tokens ({seeds} seed(s))")
    ax.legend()
    per_seed_gaps = [
        gaps(dict(zip(KINDS, pair, strict=True))) for pair in zip(*(per_seed[k] for k in KINDS), strict=True)
    ]
    for gap in per_seed_gaps:
        gap_ax.plot(ks, gap, color="tab:purple", lw=0.6, alpha=0.35)
    mean_gap = [sum(column) / seeds for column in zip(*per_seed_gaps, strict=True)]
    gap_ax.axhline(0, color="gray", lw=0.8)
    gap_ax.plot(ks, mean_gap, "o", color="tab:purple", label=f"sigmoid - softmax, mean of {seeds} seeds (thin: each)")
    summary = parts[0].summary
    ci = "" if summary.ci95 is None else f", 95% CI [{summary.ci95[0]:+.4f}, {summary.ci95[1]:+.4f}]"
    intercept = sum(mean_gap) / len(ks) - summary.mean * sum(ks) / len(ks)
    gap_ax.plot(
        ks,
        [intercept + summary.mean * k for k in ks],
        "-",
        color="tab:purple",
        alpha=0.7,
        label=f"least-squares fit: mean slope {summary.mean:+.4f} per k{ci}",
    )
    gap_ax.set_xlabel("k (tokens whose values are summed)")
    gap_ax.set_ylabel("accuracy gap (sigmoid - softmax)")
    gap_ax.set_title("the gap and its trend (the verdict's statistic)")
    gap_ax.legend(fontsize=8)
    return save_figure(fig, out, "ksum.png")


def run(size: str, out: Path, log=print) -> Outcome:
    settings = SETTINGS[size]
    per_seed = {kind: [] for kind in KINDS}
    for seed in settings.seeds:
        for kind in KINDS:
            model = train_model(settings, kind, seed)
            per_seed[kind].append(accuracy_by_k(model, settings, seed))
            log(f"  ksum {kind} seed {seed}: " + ", ".join(f"{a:.2f}" for a in per_seed[kind][-1]))
    mean = {kind: [sum(col) / len(col) for col in zip(*per_seed[kind], strict=True)] for kind in KINDS}
    parts = judgements(per_seed, settings)
    verdict = decide(parts, settings)
    figures = [
        plot(per_seed, parts, settings, out),
        judgements_figure(
            parts, out, "ksum_seeds.png", f"ksum: the verdict's statistic over {len(settings.seeds)} seeds"
        ),
    ]
    setup = f"""
* S = {settings.seqlen} context tokens + 1 query; keys in {{0..{settings.num_keys - 1}}}, values in
  {{0..{settings.num_values - 1}}}; exactly k context tokens carry the query's key, k uniform in 1..{settings.k_max}
  during training; target = the sum of their values.
* Model: key + value + role embeddings (no positions), {settings.n_layer} bidirectional `TransformerBlock`s
  (d_model {settings.d_model}, {settings.n_head} heads, pre-norm, GELU MLP), sigmoid attention with
  b = −log {settings.seqlen + 1} or softmax attention, LayerNorm and a linear readout of the query token;
  squared error on target / {target_scale(settings):g}.
* Training: AdamW (lr {settings.lr:g}, one-cycle schedule, no weight decay, clipping at 1.0), batch
  {settings.batch_size}, {settings.steps} steps; batches drawn fresh each step.
* {len(settings.seeds)} seeds ({", ".join(map(str, settings.seeds))}): per seed one model per attention, with the
  same initialisation seed and the same training and evaluation batches (paired by seed); the per-seed settings
  are those of the earlier three-seed run.
* Evaluation: {settings.eval_per_k} fresh sums per k and seed; correct = the prediction rounds to the target.
"""
    seed_gaps = [gaps(dict(zip(KINDS, pair, strict=True))) for pair in zip(*(per_seed[k] for k in KINDS), strict=True)]
    at_last = summarize_seeds([gap[-1] for gap in seed_gaps])
    overall = summarize_seeds([sum(gap) / len(gap) for gap in seed_gaps])
    rows = []
    for k in range(1, settings.k_max + 1):
        column = summarize_seeds([gap[k - 1] for gap in seed_gaps])
        ci = "—" if column.ci95 is None else f"[{column.ci95[0]:+.3f}, {column.ci95[1]:+.3f}]"
        rows.append([k, mean["sigmoid"][k - 1], mean["softmax"][k - 1], column.mean, ci])

    def described(summary) -> str:
        ci = "no interval" if summary.ci95 is None else f"95% CI [{summary.ci95[0]:+.3f}, {summary.ci95[1]:+.3f}]"
        return f"{summary.mean:+.3f} ({ci})"

    findings = (
        "Accuracy per k, mean over seeds, and the gap with its 95% interval over seeds:\n\n"
        + markdown_table(["k", "sigmoid accuracy", "softmax accuracy", "gap", "gap 95% CI"], rows)
        + f"\n\nFor context (not the verdict's statistic): the gap at k = {settings.k_max} is {described(at_last)}; "
        f"the gap averaged over k is {described(overall)}.\n\nThe verdict's statistic:\n\n" + judgements_markdown(parts)
    )
    results = {
        "accuracy": mean,
        "accuracy_per_seed": per_seed,
        "k": list(range(1, settings.k_max + 1)),
        "gap_per_seed": seed_gaps,
        "gap_at_k_max": at_last.to_dict(),
        "gap_mean_over_k": overall.to_dict(),
        "judgements": [j.to_dict() for j in parts],
    }
    return Outcome(results, verdict, {**asdict(settings), "gap_growth": GAP_GROWTH}, setup, findings, figures)
