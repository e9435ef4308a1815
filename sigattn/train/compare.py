"""``sigattn compare``: train one preset with sigmoid and with softmax attention and report side by side.

OUT/sigmoid/, OUT/softmax/   each run's folder (see ``sigattn.train.trainer``)
OUT/compare.json             the preset, overrides and configuration the comparison started with: what
                             ``--resume`` continues (no --preset needed)
OUT/summary.json             {"sigmoid": {"final_val_loss", "tokens_per_s", ...}, "softmax": {...}, ...}
OUT/report.md                the comparison as a table, with the plots
OUT/loss.png, OUT/diagnostics.png

With seeds (``sigattn compare --seeds 0 1 2``) each seed's comparison is OUT/seed-S/ (the layout above, with
train.seed=S), and OUT/summary.json and OUT/report.md are over the seeds (``write_seed_comparison``): per
attention the mean and 95% t-interval of the final validation loss, of the loss at each evaluated context
and of tokens/s, and the difference sigmoid - softmax paired by seed, with its interval and whether it is
within the seeds' noise (the interval holds 0).

The runs go one after the other. A SIGINT (Ctrl-C) or SIGTERM stops the whole comparison: the run in
progress stops after its current step with a checkpoint, the other does not start, and the summary and
report written then say which runs were stopped (at which step) or not started.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..runinfo import nan_for_null, strict_json, utc_date, versions
from ..stats import summarize_seeds
from .config import RunConfig
from .metrics import read_metrics
from .parallel import checkpoint_exists
from .plots import plot_runs
from .presets import build_config
from .trainer import CHECKPOINT, COMPARE_FILE, Interrupted, Log, StopRequest, Trainer, TrainError

ATTNS = ("sigmoid", "softmax")
SUMMARY_KEYS = (
    "final_val_loss",
    "tokens_per_s",
    "val_loss_by_context",
    "train_seconds",
    "steps",
    "max_steps",
    "tokens",
    "grad_spikes",
)


def compare(
    preset: str | None,
    out_dir: str | Path,
    overrides: list[str] = (),
    *,
    max_steps: int | None = None,
    resume: bool = False,
    log: Log | None = None,
) -> dict:
    """Trains ``preset`` with each attention into ``out_dir/<attn>``, then ``write_comparison``; returns the
    summary, whose ``stopped_by`` names the signal that stopped the comparison (None if none did).

    ``resume`` continues the runs that have a checkpoint and starts the others; the comparison's
    compare.json then gives the preset and settings (``preset`` may be None), and ``overrides`` and
    ``max_steps`` may change what ``Trainer`` allows on resume. A second signal raises ``Interrupted``, whose
    ``run_dir`` is the run it stopped."""
    out_dir = Path(out_dir)
    overrides = list(overrides)
    saved = _load_compare_file(out_dir) if resume and preset is None else None
    if saved is not None:
        preset, base = saved["preset"], saved["config"]
        extra = overrides + ([f"train.max_steps={max_steps}"] if max_steps is not None else [])
        configs = {attn: _config_from_dict(base, attn, extra) for attn in ATTNS}
        overrides = saved["overrides"] + overrides
    else:
        if preset is None:
            raise TrainError("compare needs --preset NAME (or --resume to continue the comparison in --out)")
        if (out_dir / CHECKPOINT).exists() or checkpoint_exists(out_dir):  # its plots would be overwritten
            raise TrainError(f"{out_dir} holds a training run, not a comparison: choose another --out")
        configs = {attn: build_config(preset, overrides, attn=attn, max_steps=max_steps) for attn in ATTNS}
    with StopRequest() as stop:
        for attn in ATTNS:
            if stop.requested:
                break
            run_dir = out_dir / attn
            try:
                trainer = Trainer(configs[attn], run_dir, resume=resume and (run_dir / CHECKPOINT).exists(), log=log)
                try:
                    if saved is None and attn == ATTNS[0]:
                        _write_compare_file(out_dir, preset, overrides, trainer.config)
                    trainer.fit(stop=stop)
                finally:
                    trainer.parallel.close()
            except Interrupted as interrupted:
                interrupted.run_dir = run_dir  # the caller names this run's checkpoint, not the first run's
                raise
    return write_comparison(out_dir, Path(preset).stem, overrides, stopped_by=stop.name)


def _write_compare_file(out_dir: Path, preset: str, overrides: list[str], config: RunConfig) -> None:
    settings = config.to_dict()
    settings["model"]["attn"] = "(both)"
    text = strict_json({"preset": preset, "overrides": overrides, "config": settings}, indent=2)
    (out_dir / COMPARE_FILE).write_text(text + "\n")


def _load_compare_file(out_dir: Path) -> dict:
    """compare.json's contents; for a comparison from before compare.json, its sigmoid run's config.json."""
    path = out_dir / COMPARE_FILE
    if not path.exists():
        config_path = out_dir / "sigmoid" / "config.json"
        if not config_path.is_file():
            raise TrainError(
                f"--resume: no comparison in {out_dir} (no {COMPARE_FILE}): give the --out of a comparison, or "
                "start one with --preset"
            )
        return {"preset": "(unknown)", "overrides": [], "config": _read_json(config_path, "a run's config.json")}
    saved = _read_json(path, "a comparison's compare.json")
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("config"), dict)
        and isinstance(saved.get("preset"), str)
        and isinstance(saved.get("overrides"), list)
    ):
        raise TrainError(f"{path}: expected {{preset, overrides, config}}; restore it or start a new comparison")
    return saved


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise TrainError(f"cannot read {path} ({error}): expected {what}; restore it from a backup") from None


def _read_result(path: Path) -> dict:
    """A run's result.json. Strict JSON wrote a non-finite loss (a diverged run's) as null: it is nan again in
    val_loss_by_context, and in final_val_loss of a run at its max_steps (which has evaluated, so its null
    is no "not evaluated yet")."""
    result = _read_json(path, "a run's result.json")
    if result.get("val_loss_by_context") is not None:
        result["val_loss_by_context"] = nan_for_null(result["val_loss_by_context"])
    if result.get("steps") == result.get("max_steps"):
        result["final_val_loss"] = nan_for_null(result.get("final_val_loss"))
    return result


def _config_from_dict(base: dict, attn: str, overrides: list[str]) -> RunConfig:
    """The saved comparison's configuration for ``attn``, with ``overrides``."""
    return RunConfig.from_dict({**base, "model": {**base["model"], "attn": attn}}, overrides)


def write_comparison(
    out_dir: str | Path, preset: str | None, overrides: list[str] = (), *, stopped_by: str | None = None
) -> dict:
    """summary.json, report.md, loss.png and diagnostics.png in ``out_dir`` from the runs in
    ``out_dir/sigmoid`` and ``out_dir/softmax`` (their result.json, config.json and metrics.jsonl); returns
    the summary.

    ``stopped_by`` (the signal that stopped the comparison, if one did) allows a run that has not started;
    otherwise both runs must have a result.json. ``preset`` None: compare.json's."""
    out_dir = Path(out_dir)
    if preset is None:
        saved = _load_compare_file(out_dir)
        preset, overrides = Path(saved["preset"]).stem, saved["overrides"] + list(overrides)
    results, runs = {}, {}
    for attn in ATTNS:
        path = out_dir / attn / "result.json"
        if not path.is_file():
            if stopped_by is None:
                raise TrainError(f"no {path}: train both attentions first (sigattn compare without --report-only)")
            results[attn] = None
            continue
        results[attn] = _read_result(path)
        runs[attn] = read_metrics(out_dir / attn / "metrics.jsonl")
    started = next(attn for attn in ATTNS if results[attn] is not None)
    config = _read_json(out_dir / started / "config.json", "a run's config.json")
    summary = summarize(preset, list(overrides), config, results)
    summary["stopped_by"] = stopped_by
    (out_dir / "summary.json").write_text(strict_json(summary, indent=2) + "\n")
    try:
        plots = [p.name for p in plot_runs(runs, out_dir)]
    except ImportError as error:  # no matplotlib
        print(f"sigattn compare: no plots: {error}", file=sys.stderr)
        plots = []
    (out_dir / "report.md").write_text(report(summary, plots, out_dir))
    return summary


def incomplete(results: dict[str, dict | None]) -> dict[str, str]:
    """The runs that have not reached their max_steps, with what happened: "stopped at step 300 of 600 by
    SIGINT", "stopped at step 300 of 600" or "not started"."""
    out = {}
    for attn, r in results.items():
        if r is None:
            out[attn] = "not started"
        elif r["steps"] < r["max_steps"]:
            by = f" by {r['stopped_by']}" if r.get("stopped_by") else ""
            out[attn] = f"stopped at step {r['steps']} of {r['max_steps']}{by}"
    return out


def _run_summary(result: dict | None) -> dict | None:
    """One run's part of summary.json: its SUMMARY_KEYS, folder, stopping signal and parameter count (None
    if not started; the count None for a run from before it was recorded)."""
    if result is None:
        return None
    extra = {"out_dir": result["out_dir"], "stopped_by": result.get("stopped_by"), "params": result.get("params")}
    return {k: result[k] for k in SUMMARY_KEYS} | extra


def summarize(preset: str, overrides: list[str], config: dict, results: dict[str, dict | None]) -> dict:
    """The summary.json object: per attention its SUMMARY_KEYS (None for a run not started), the runs that
    did not finish (``incomplete``), the gaps, and where and how it ran."""
    summary: dict = {attn: _run_summary(r) for attn, r in results.items()}
    summary["incomplete"] = incomplete(results)
    sig, soft = results["sigmoid"] or {}, results["softmax"] or {}
    if sig.get("final_val_loss") is not None and soft.get("final_val_loss"):
        summary["val_loss_gap"] = (sig["final_val_loss"] - soft["final_val_loss"]) / soft["final_val_loss"]
    if sig.get("tokens_per_s") and soft.get("tokens_per_s"):
        summary["tokens_per_s_ratio"] = sig["tokens_per_s"] / soft["tokens_per_s"]
    devices = {r["device"] for r in results.values() if r is not None}
    summary.update(
        preset=preset,
        overrides=overrides,
        config=config | {"model": {**config["model"], "attn": "(both)"}},
        device=" / ".join(sorted(devices)),
        versions=versions(),
        date=utc_date(),
        command=" ".join(["sigattn", *sys.argv[1:]]) if Path(sys.argv[0]).name == "sigattn" else None,
    )
    return summary


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(summary: dict, plots: list[str], out_dir: str | Path | None = None) -> str:
    """The comparison as markdown: which runs did not finish (first, if any), a table of both runs, the gaps,
    and the plots. ``out_dir`` goes into the resume command of an unfinished comparison."""
    sig, soft = summary["sigmoid"] or {}, summary["softmax"] or {}
    contexts = sorted({int(n) for r in (sig, soft) for n in (r.get("val_loss_by_context") or {})})
    lines = [
        f"# Sigmoid vs softmax attention: preset `{summary['preset']}`",
        "",
        f"{summary['date']} on {summary['device']}; "
        + ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v)
        + (f"; overrides: `{' '.join(summary['overrides'])}`" if summary["overrides"] else ""),
        "",
    ]
    if summary["incomplete"]:
        where = f" --out {out_dir}" if out_dir is not None else " --out DIR"
        lines += [
            "**Not a finished comparison:** "
            + "; ".join(f"{attn} {what}" for attn, what in summary["incomplete"].items())
            + f". Its numbers are the runs' so far; finish them with `sigattn compare --resume{where}`.",
            "",
        ]

    def row(name: str, key: str, spec: str) -> str:
        return f"| {name} | {_fmt(sig.get(key), spec)} | {_fmt(soft.get(key), spec)} |"

    lines += ["| | sigmoid | softmax |", "| --- | --- | --- |", row("final validation loss", "final_val_loss", ".4f")]
    for n in contexts:
        values = [(r.get("val_loss_by_context") or {}).get(str(n)) for r in (sig, soft)]
        lines.append(f"| validation loss at context {n} | {_fmt(values[0], '.4f')} | {_fmt(values[1], '.4f')} |")
    lines += [
        row("tokens/s (training steps)", "tokens_per_s", ",.0f"),
        row("training time (s)", "train_seconds", ".1f"),
        row("steps", "steps", "d"),
        row("gradient-norm spikes", "grad_spikes", "d"),
        "",
    ]
    if "val_loss_gap" in summary:
        gap = summary["val_loss_gap"]
        lines.append(f"Sigmoid's final validation loss is {abs(gap):.2%} {'above' if gap > 0 else 'below'} softmax's.")
    if "tokens_per_s_ratio" in summary:
        lines.append(f"Sigmoid trains at {summary['tokens_per_s_ratio']:.2f}x softmax's tokens/s.")
    lines.append("")
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- over seeds


def seed_dir(out_dir: str | Path, seed: int) -> Path:
    """The folder of one seed's comparison."""
    return Path(out_dir) / f"seed-{seed}"


def write_seed_comparison(out_dir: str | Path, seeds: list[int]) -> dict:
    """summary.json and report.md in ``out_dir`` over the finished comparisons of ``seeds`` (each
    ``seed_dir``'s summary.json, as ``write_comparison`` wrote it); returns the summary. Every seed's
    comparison must be complete: both runs at their max_steps with a final validation loss."""
    out_dir = Path(out_dir)
    per_seed = {}
    for seed in seeds:
        path = seed_dir(out_dir, seed) / "summary.json"
        if not path.is_file():
            raise TrainError(f"no {path}: seed {seed}'s comparison has not finished (sigattn compare --seeds ...)")
        summary = _read_json(path, "a comparison's summary.json")
        if summary.get("incomplete"):
            what = "; ".join(f"{attn} {why}" for attn, why in summary["incomplete"].items())
            raise TrainError(f"seed {seed}'s comparison is not finished ({what}): resume it first")
        per_seed[seed] = summary
    summary = summarize_over_seeds(per_seed)
    (out_dir / "summary.json").write_text(strict_json(summary, indent=2) + "\n")
    (out_dir / "report.md").write_text(seed_report(summary))
    return summary


def summarize_over_seeds(per_seed: dict[int, dict]) -> dict:
    """The seeds' summary.json object from each seed's comparison summary (``summarize``'s): per attention the
    SeedSummary (values, mean, sd, ci95, detectable difference) of the final validation loss, of the loss
    at each context all seeds evaluated, and of tokens/s; the paired differences sigmoid - softmax of the
    losses and the ratio of tokens/s; ``within_noise``: the final loss difference's interval holds 0 (None
    with one seed)."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]

    # Every seed's runs finished, so a null number in their summary.json is a non-finite one (strict JSON): nan.
    def values(attn: str, key: str) -> list[float]:
        return [nan_for_null(per_seed[s][attn][key]) for s in seeds]

    def by_context(attn: str) -> dict[str, list[float]]:
        common = set.intersection(*(set(per_seed[s][attn]["val_loss_by_context"] or {}) for s in seeds))
        return {
            n: [nan_for_null(per_seed[s][attn]["val_loss_by_context"][n]) for s in seeds]
            for n in sorted(common, key=int)
        }

    out: dict = {"seeds": seeds, "preset": first["preset"], "overrides": first["overrides"]}
    contexts = {attn: by_context(attn) for attn in ATTNS}
    for attn in ATTNS:
        out[attn] = {
            "final_val_loss": summarize_seeds(values(attn, "final_val_loss")).to_dict(),
            "val_loss_by_context": {n: summarize_seeds(v).to_dict() for n, v in contexts[attn].items()},
            "tokens_per_s": summarize_seeds(values(attn, "tokens_per_s")).to_dict(),
            "params": first[attn].get("params"),
        }
    difference = [
        a - b for a, b in zip(values("sigmoid", "final_val_loss"), values("softmax", "final_val_loss"), strict=True)
    ]
    shared = sorted(set(contexts["sigmoid"]) & set(contexts["softmax"]), key=int)
    ratio = [a / b for a, b in zip(values("sigmoid", "tokens_per_s"), values("softmax", "tokens_per_s"), strict=True)]
    out["difference"] = {
        "final_val_loss": summarize_seeds(difference).to_dict(),
        "val_loss_by_context": {
            n: summarize_seeds(
                [a - b for a, b in zip(contexts["sigmoid"][n], contexts["softmax"][n], strict=True)]
            ).to_dict()
            for n in shared
        },
        "tokens_per_s_ratio": summarize_seeds(ratio).to_dict(),
    }
    interval = out["difference"]["final_val_loss"]["ci95"]
    # None: one seed, or a diverged run (a loss that is not finite, whose interval is nan)
    finite = interval is not None and all(map(math.isfinite, interval))
    out["within_noise"] = interval[0] <= 0.0 <= interval[1] if finite else None
    out["meta"] = {
        "device": " / ".join(sorted({per_seed[s]["device"] for s in seeds})),
        "versions": first["versions"],
        "dates": sorted({per_seed[s]["date"] for s in seeds}),
        "command": " ".join(["sigattn", *sys.argv[1:]]) if Path(sys.argv[0]).name == "sigattn" else None,
    }
    out["config"] = first["config"]
    return out


def _mean_ci(stat: dict, spec: str) -> str:
    if stat["ci95"] is None:
        return format(stat["mean"], spec)
    half = (stat["ci95"][1] - stat["ci95"][0]) / 2
    return f"{format(stat['mean'], spec)} ± {format(half, spec)}"


def seed_report(summary: dict) -> str:
    """The seeds' comparison as markdown: means ± 95% half-intervals per attention, the paired difference,
    and whether it is within the seeds' noise."""
    seeds = summary["seeds"]
    sig, soft, diff = summary["sigmoid"], summary["softmax"], summary["difference"]
    meta = summary["meta"]
    lines = [
        f"# Sigmoid vs softmax attention over {len(seeds)} seeds: preset `{summary['preset']}`",
        "",
        f"{', '.join(meta['dates'])} on {meta['device']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
        + f"; seeds {', '.join(map(str, seeds))}"
        + (f"; overrides: `{' '.join(summary['overrides'])}`" if summary["overrides"] else ""),
        "",
        "Mean ± half the 95% t-interval over the seeds; the difference is sigmoid − softmax, paired by seed.",
        "",
        "| | sigmoid | softmax | difference |",
        "| --- | --- | --- | --- |",
        f"| final validation loss | {_mean_ci(sig['final_val_loss'], '.4f')} | "
        f"{_mean_ci(soft['final_val_loss'], '.4f')} | {_mean_ci(diff['final_val_loss'], '+.4f')} |",
    ]
    for n, d in diff["val_loss_by_context"].items():
        a, b = sig["val_loss_by_context"][n], soft["val_loss_by_context"][n]
        lines.append(
            f"| validation loss at context {n} | {_mean_ci(a, '.4f')} | {_mean_ci(b, '.4f')} | {_mean_ci(d, '+.4f')} |"
        )
    lines += [
        f"| tokens/s | {_mean_ci(sig['tokens_per_s'], ',.0f')} | {_mean_ci(soft['tokens_per_s'], ',.0f')} | "
        f"{_mean_ci(diff['tokens_per_s_ratio'], '.3f')}x |",
        f"| parameters | {_fmt(sig['params'], ',d')} | {_fmt(soft['params'], ',d')} | |",
        "",
    ]
    interval = diff["final_val_loss"]["ci95"]
    if interval is None:
        lines.append("One seed: no interval, so no statement about noise.")
    elif summary["within_noise"] is None:
        lines.append("A run diverged (a final validation loss is not finite): no interval, no statement about noise.")
    elif summary["within_noise"]:
        lines.append(
            f"The final validation losses differ by {diff['final_val_loss']['mean']:+.4f}, within the seeds' noise: "
            f"the 95% interval [{interval[0]:+.4f}, {interval[1]:+.4f}] holds 0 (a difference of "
            f"{diff['final_val_loss']['detectable']:.4f} would have been detected with 80% power)."
        )
    else:
        side = "below" if interval[1] < 0 else "above"
        lines.append(
            f"Sigmoid's final validation loss is {side} softmax's beyond the seeds' noise: the 95% interval of the "
            f"difference is [{interval[0]:+.4f}, {interval[1]:+.4f}]."
        )
    lines += [
        "",
        "Each seed's comparison, with its plots: " + ", ".join(f"[seed {s}](seed-{s}/report.md)" for s in seeds),
    ]
    return "\n".join(lines) + "\n"
