"""The ``sigattn train`` and ``sigattn compare`` subcommands: their options and what runs them.

    sigattn train --preset NAME [--attn sigmoid|softmax] [--out DIR] [--max-steps N] [--resume] [key=value ...]
    sigattn compare --preset NAME --out DIR [--max-steps N] [--resume] [--report-only] [key=value ...]

``sigattn.cli`` adds these to its parser; the run functions return the exit status and raise one of
``USER_ERRORS`` for a problem the user can fix.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..data import CorpusUnavailableError
from .compare import compare, write_comparison
from .config import ConfigError, setting_names
from .metrics import MetricsError
from .presets import build_config, preset_names
from .trainer import TrainError, train

USER_ERRORS = (ConfigError, TrainError, CorpusUnavailableError, MetricsError)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", required=True, metavar="NAME",
        help=f"a bundled preset ({', '.join(preset_names())}) or a path to a .toml (or .json) file of the same form",
    )  # fmt: skip
    parser.add_argument("--max-steps", type=positive_int, metavar="N", help="train for N steps (train.max_steps)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in the output folder")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="change a setting, e.g. model.n_layer=6 or lr=3e-4 (section.key or an unambiguous key); "
        "see --list-settings",
    )  # fmt: skip
    parser.add_argument(
        "--list-settings", action="store_true", help="print the preset's settings as key=value overrides and exit"
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser)
    parser.add_argument("--attn", choices=("sigmoid", "softmax"), help="the attention (model.attn)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: runs/PRESET-ATTN)")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--report-only", action="store_true",
        help="train nothing: write summary.json, report.md and plots from the finished runs in DIR/sigmoid and "
        "DIR/softmax",
    )  # fmt: skip


def _list_settings(args: argparse.Namespace) -> int:
    config = build_config(args.preset, args.overrides, attn=getattr(args, "attn", None), max_steps=args.max_steps)
    flat = config.to_dict()
    for name in setting_names(config.task):
        section, key = name.split(".")
        print(f"{name}={override_text(flat[section][key])}")
    return 0


def override_text(value) -> str:
    """A setting's value as an override writes it: none, true/false, comma-separated ints, or as is."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def run_train(args: argparse.Namespace) -> int:
    if args.list_settings:
        return _list_settings(args)
    config = build_config(args.preset, args.overrides, attn=args.attn, max_steps=args.max_steps)
    preset = Path(args.preset).stem
    out = Path(args.out) if args.out else Path("runs") / f"{preset}-{config.model.attn}"
    result = train(config, out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone reports
        print(json.dumps(result.to_dict(), indent=2))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    if args.list_settings:
        return _list_settings(args)
    if args.report_only:
        summary = write_comparison(args.out, Path(args.preset).stem, args.overrides)
    else:
        summary = compare(args.preset, args.out, args.overrides, max_steps=args.max_steps, resume=args.resume)
    for attn in ("sigmoid", "softmax"):
        r = summary[attn]
        val = "n/a" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}"
        speed = "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        print(f"{attn:<8} final val loss {val}   {speed} tokens/s   {r['train_seconds']:.1f} s")
    if "val_loss_gap" in summary:
        print(f"sigmoid vs softmax: val loss {summary['val_loss_gap']:+.2%}")
    print(f"wrote {Path(args.out) / 'summary.json'}, report.md and plots")
    return 0
