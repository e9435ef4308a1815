"""Experiments that test the seed papers' claims about sigmoid attention, one module each.

    sigattn experiment NAME [--quick | --size SIZE] [--out DIR]

writes ``DIR/result.json``, ``DIR/report.md`` and PNG plots (see ``common``). Every report states the
measured numbers and whether they support the claim, by a rule the report states; ``results/README.md``
collects the plots and verdicts.
"""

from __future__ import annotations

from pathlib import Path

from . import bias_ablation, ksum, length_extrapolation, moe_rates, regularity
from .common import CPU_SIZES, SIZES, Experiment, Outcome, Verdict, run_experiment

EXPERIMENTS = {
    e.name: e
    for e in (
        Experiment(
            name="moe-rates",
            title="Sample complexity of sigmoid vs softmax gating",
            source="arXiv 2502.00281",
            claim="in the dense gating regime, least squares recovers a sigmoid-gated quadratic-score mixture of "
            "experts (one attention row) with an error falling near n^(-1/2), faster than the softmax-gated one.",
            run=moe_rates.run,
            full_runtime="15 min (8 seeds) on a 2-core CPU shared with other jobs",
        ),
        Experiment(
            name="bias-ablation",
            title="Training stability: the bias b and the norms",
            source="arXiv 2409.04431",
            claim="large attention-output norms at initialisation destabilise sigmoid attention: with b = 0 the "
            "norm grows with the sequence length n, with b = -log n it does not, and b = -log n trains at "
            "least as stably as b = 0 with or without QK-norm and hybrid-norm + LayerScale.",
            run=bias_ablation.run,
            full_runtime="26 min (2 seeds) on a 2-core CPU shared with other jobs",
            sizes=(*CPU_SIZES, "gpu"),
        ),
        Experiment(
            name="regularity",
            title="Local Lipschitz constant against the input radius",
            source="arXiv 2409.04431",
            claim="the local Lipschitz constant of a sigmoid attention layer grows polynomially with the input "
            "radius, that of a softmax attention layer exponentially.",
            run=regularity.run,
            full_runtime="9 min (8 seeds) on a 2-core CPU shared with other jobs",
        ),
        Experiment(
            name="length-extrapolation",
            title="Length extrapolation with the bias fixed at -log(training length)",
            source="arXiv 2409.04431 (setting); hypothesis ours",
            claim="trained at context L with b fixed at -log L, sigmoid attention extrapolates to 2L-8L as well "
            "as softmax with the same position encoding, and ALiBi extrapolates better than RoPE.",
            run=length_extrapolation.run,
            full_runtime="14 min (5 seeds) on a 2-core CPU shared with other jobs",
        ),
        Experiment(
            name="ksum",
            title="Summing k selected values: token competition",
            source="arXiv 2502.00281 (motivation)",
            claim="softmax's competition between tokens hurts as k grows: on sums of k selected values, softmax's "
            "accuracy falls behind sigmoid's at large k.",
            run=ksum.run,
            full_runtime="15 min (6 seeds) on a 2-core CPU shared with other jobs",
        ),
    )
}


def run(
    name: str,
    out_dir: str | Path,
    *,
    quick: bool = False,
    size: str | None = None,
    log=print,
    command: str | None = None,
) -> dict:
    """Runs experiment ``name`` at ``size`` (default: "quick" if ``quick`` else "full") into ``out_dir``;
    returns result.json's contents."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of {', '.join(EXPERIMENTS)}")
    if quick and size not in (None, "quick"):
        raise ValueError(f"quick=True asks for size 'quick', but size={size!r} was given: pass one of them")
    size = size or ("quick" if quick else "full")
    experiment = EXPERIMENTS[name]
    return run_experiment(experiment, size, out_dir, log=log, command=command)


__all__ = ["EXPERIMENTS", "SIZES", "Experiment", "Outcome", "Verdict", "run", "run_experiment"]
