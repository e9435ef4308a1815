"""``sigattn bench``: its options, the checks that need no GPU, and the choice of sweep: the dense sweep or
the memory check (``sigattn.bench.sweep``), or the inference sweeps, ``--decode`` and ``--varlen``
(``sigattn.bench.inference``). ``sigattn.cli`` registers ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

import torch

from . import inference, sweep
from .sweep import (
    DTYPES,
    HEADDIMS,
    HIDDEN,
    MATRIX_SEQLENS,
    MEMORY_MODE,
    MODES,
    PROVIDERS,
    QUICK_HEADDIMS,
    QUICK_MATRIX_SEQLENS,
    QUICK_SEQLENS,
    QUICK_TIMING,
    SEQLENS,
    TIMING,
    TOKENS,
    Plan,
    matrix_shapes,
    memory_shapes,
    sweep_shapes,
)


def parse_seqlen(text: str) -> int:
    """512, 4096, 4k (= 4096)."""
    try:
        value = int(text[:-1]) * 1024 if text.lower().endswith("k") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a length such as 512, 4096 or 4k, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive length, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the options of ``sigattn bench`` on ``parser``."""
    parser.description = (
        "Speed and memory of sigmoid attention against softmax-attention baselines on a CUDA GPU, in "
        f"flash-attn's setup ({TOKENS} tokens, hidden {HIDDEN}); TFLOP/s from the median of "
        "triton.testing.do_bench. See the docstring of sigattn/bench/sweep.py for the JSON schema."
    )
    parser.add_argument("--headdim", type=int, nargs="+", metavar="D", help="head dimensions (default: 64 128)")
    parser.add_argument(
        "--seqlen",
        type=parse_seqlen,
        nargs="+",
        metavar="S",
        help="sequence lengths, e.g. 512 2k (default: 512 1k 2k 4k 8k 16k)",
    )
    parser.add_argument("--causal", action="store_true", help="causal attention only (default: causal and full)")
    parser.add_argument("--full", action="store_true", help="full (non-causal) attention only")
    parser.add_argument(
        "--providers",
        nargs="+",
        choices=list(PROVIDERS),
        default=list(PROVIDERS),
        metavar="P",
        help=f"among {', '.join(PROVIDERS)} (default: all)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        metavar="M",
        help=f"among {', '.join(MODES)} (default: all)",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="draw the results as a PNG (matplotlib): TFLOP/s vs seqlen, or with --matrix bars per configuration",
    )
    parser.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="instead of measuring: draw --plot from a saved --json run (no GPU needed)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"headdim {QUICK_HEADDIMS[0]}, seqlen 1k and 4k, shorter timing"
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="instead of the sweep: peak memory of forward + backward at B=1, H=16, D=128, "
        "seqlen 64k, beyond inputs, output and gradients",
    )
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="instead of the sweep: the configuration matrix (sliding windows, ALiBi, per-head bias, "
        "deterministic, dropout, every head dim, Dqk/Dv 192/128, GQA 32/8) at seqlen 1k 4k 16k",
    )
    parser.add_argument(
        "--config",
        metavar="REGEX",
        help="with --matrix: only the configurations whose label matches (e.g. 'window', 'gqa'; 'plain' for "
        "the plain head-dim rows)",
    )
    parser.add_argument(
        "--decode",
        action="store_true",
        help="instead of the sweep: KV-cache decode bandwidth (GB/s) against SDPA's backends and a copy "
        "(see sigattn/bench/inference.py)",
    )
    parser.add_argument(
        "--varlen",
        action="store_true",
        help="instead of the sweep: packed sequences against the dense kernel and a per-sequence loop",
    )


def _check_inference_args(args: argparse.Namespace) -> None:
    """--decode and --varlen run their own fixed sweeps: the dense sweep's options do not apply."""
    chosen = [f"--{n}" for n in ("memory", "matrix", "decode", "varlen") if getattr(args, n)]
    if len(chosen) > 1:
        raise ValueError(f"choose one of --memory, --matrix, --decode and --varlen, got {' '.join(chosen)}")
    if args.config is not None:
        raise ValueError("--config selects configurations of --matrix: drop it")
    conflicting = [f"--{n}" for n in ("headdim", "seqlen", "causal", "full") if getattr(args, n)]
    conflicting += ["--modes"] if args.modes != list(MODES) else []
    conflicting += ["--providers"] if args.providers != list(PROVIDERS) else []
    conflicting += ["--dtype"] if args.dtype != "bf16" else []
    conflicting += ["--plot"] if args.varlen and args.plot else []
    if conflicting:
        raise ValueError(f"{chosen[0]} runs its own fixed sweep (bf16): drop {', '.join(conflicting)}")


def make_plan(args: argparse.Namespace) -> Plan:
    """The dense sweep (or the memory check) that ``args`` asks for; ValueError for conflicting options."""
    causals = [c for c, flag in ((True, args.causal), (False, args.full)) if flag] or [True, False]
    providers = list(dict.fromkeys(args.providers))
    timing = QUICK_TIMING if args.quick else TIMING
    if args.config is not None and not args.matrix:
        raise ValueError("--config selects configurations of the matrix: add --matrix")
    if args.matrix:
        if args.memory:
            raise ValueError("choose one of --memory and --matrix")
        conflicting = [f"--{n}" for n in ("headdim", "causal", "full") if getattr(args, n)]
        if conflicting:
            raise ValueError(f"--matrix fixes head dims and masks: drop {', '.join(conflicting)}")
        seqlens = args.seqlen or (QUICK_MATRIX_SEQLENS if args.quick else MATRIX_SEQLENS)
        shapes = matrix_shapes(seqlens, args.dtype)
        if args.config is not None:
            try:
                pattern = re.compile(args.config)
            except re.error as error:
                raise ValueError(f"--config must be a regular expression, got {args.config!r} ({error})") from None
            shapes = [s for s in shapes if pattern.search(s.config or "plain")]
            if not shapes:
                raise ValueError(f"--config {args.config!r} matches no configuration of the matrix")
        return Plan(shapes, list(dict.fromkeys(args.modes)), providers, timing)
    if args.memory:
        conflicting = [f"--{n}" for n in ("headdim", "seqlen", "quick", "plot") if getattr(args, n)]
        conflicting += ["--modes"] if args.modes != list(MODES) else []
        if conflicting:
            raise ValueError(f"--memory measures one fixed shape and draws no plot: drop {', '.join(conflicting)}")
        return Plan(memory_shapes(causals, args.dtype), [MEMORY_MODE], providers, timing)
    headdims = args.headdim or (QUICK_HEADDIMS if args.quick else HEADDIMS)
    seqlens = args.seqlen or (QUICK_SEQLENS if args.quick else SEQLENS)
    if bad := [d for d in headdims if HIDDEN % d]:
        raise ValueError(f"--headdim must divide the hidden size {HIDDEN}, got {bad}")
    modes = list(dict.fromkeys(args.modes))
    return Plan(sweep_shapes(headdims, seqlens, causals, args.dtype), modes, providers, timing)


def _replot(args: argparse.Namespace, fail) -> int:
    """``--replot JSON --plot PATH``: draws a saved run; every measuring option is refused."""
    measuring = [
        f"--{name}" for name in ("headdim", "seqlen", "causal", "full", "json", "quick", "memory", "matrix", "config",
                                 "decode", "varlen") if getattr(args, name, None)
    ]  # fmt: skip
    if measuring:
        return fail(f"--replot draws a saved run and measures nothing: drop {', '.join(measuring)}", 2)
    if args.plot is None:
        return fail("--replot needs --plot PATH (the PNG to draw)", 2)
    if importlib.util.find_spec("matplotlib") is None:
        return fail("--plot needs matplotlib: pip install 'sigattn[bench]'", 2)
    try:
        sweep.replot(args.replot, args.plot)
    except (OSError, ValueError, KeyError) as error:
        return fail(f"--replot {args.replot}: {error!r}", 2)
    print(f"wrote {args.plot}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs ``sigattn bench`` (``args.argv``: the command line after ``sigattn``); returns the exit status."""

    def fail(message: str, status: int) -> int:
        print(f"sigattn bench: error: {message}", file=sys.stderr)
        return status

    if getattr(args, "replot", None) is not None:
        return _replot(args, fail)
    wants_inference = getattr(args, "decode", False) or getattr(args, "varlen", False)
    try:
        if wants_inference:
            _check_inference_args(args)
        else:
            plan = make_plan(args)
    except ValueError as error:
        return fail(str(error), 2)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        return fail("--plot needs matplotlib: pip install 'sigattn[bench]'", 2)
    if not torch.cuda.is_available():
        return fail(
            f"the benchmark needs a CUDA GPU, and torch {torch.__version__} sees none "
            "(torch.cuda.is_available() is False)",
            1,
        )
    if importlib.util.find_spec("triton") is None:
        return fail("the benchmark times with triton.testing.do_bench: pip install 'sigattn[triton]'", 1)

    argv = getattr(args, "argv", sys.argv[1:])
    if wants_inference:
        return inference.run(args, argv)
    return sweep.run(plan, args, argv)
