"""The ``sigattn train`` and ``sigattn compare`` subcommands: their options and what runs them.

    sigattn train --preset NAME [--attn sigmoid|softmax] [--out DIR] [--max-steps N] [key=value ...]
    sigattn train --resume --out DIR [--max-steps N] [key=value ...]
    sigattn compare --preset NAME --out DIR [--max-steps N] [--json] [key=value ...]
    sigattn compare --resume --out DIR [--max-steps N] [--json] [key=value ...]
    sigattn compare --report-only --out DIR [--json]
    sigattn compare (--preset NAME | --resume | --report-only) --seeds S,S,... --out DIR [...]

``--resume`` needs nothing but the run's folder: its config.json (compare.json for a comparison) is the
configuration. Overrides given with it may change only what does not change the computation
(``config.RESUMABLE_CHANGES``), and ``--max-steps`` may extend the run, a finished one too.

A SIGINT (Ctrl-C) or SIGTERM stops a run after its current step with a checkpoint; the command then prints
the command that resumes it and exits with 128 + the signal's number (130, 143), as a shell reports a
process killed by the signal. ``compare`` stops entirely (the other run does not start).

``sigattn.cli`` adds these to its parser; the run functions return the exit status and raise one of
``USER_ERRORS`` for a problem the user can fix.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

from ..data import CorpusUnavailableError
from ..runinfo import strict_json
from .compare import ATTNS, COMPARE_FILE, compare, seed_dir, write_comparison, write_seed_comparison
from .config import ConfigError, RunConfig, setting_names
from .metrics import MetricsError
from .presets import build_config, preset_names
from .trainer import CHECKPOINT, Interrupted, TrainError, train

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
        "--preset",
        metavar="NAME",
        help=f"a bundled preset ({', '.join(preset_names())}) or a path to a .toml (or .json) file of the same form; "
        "not needed with --resume",
    )
    parser.add_argument(
        "--max-steps",
        type=positive_int,
        metavar="N",
        help="train for N steps (train.max_steps); with --resume, a larger N extends the run",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run (or comparison) saved in --out DIR with its own settings (its config.json or "
        "compare.json)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="change a setting, e.g. model.n_layer=6 or lr=3e-4 (section.key or an unambiguous key); "
        "see --list-settings",
    )
    parser.add_argument(
        "--list-settings", action="store_true", help="print the preset's settings as key=value overrides and exit"
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser)
    parser.add_argument("--attn", choices=ATTNS, help="the attention (model.attn)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: runs/PRESET-ATTN)")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write summary.json, report.md and plots from the finished runs in DIR/sigmoid and "
        "DIR/softmax",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the summary (summary.json's contents) as JSON on stdout; the other lines go to stderr",
    )
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        metavar="S,S,...",
        help="one comparison per seed (train.seed) in DIR/seed-S, then DIR/summary.json and report.md over them: "
        "means with 95%% t-intervals and the paired difference sigmoid - softmax (e.g. --seeds 0,1,2)",
    )


def _seed_list(text: str) -> list[int]:
    """--seeds' value: distinct non-negative integers separated by commas."""
    parts = text.split(",")
    if not all(p.strip().isdigit() for p in parts) or len(set(map(int, parts))) != len(parts):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers separated by commas, got {text!r}")
    return [int(p) for p in parts]


def _run_seeds(args: argparse.Namespace, out: Path) -> int:
    """``compare --seeds``: each seed's comparison in turn (started, resumed, or only reported), then the
    summary over the seeds."""
    seeds = args.seeds
    if any(o.split("=", 1)[0] in ("train.seed", "seed") for o in args.overrides):
        raise TrainError("--seeds sets train.seed for each comparison: drop the train.seed override")
    if args.preset is None and not (args.resume or args.report_only):
        raise TrainError("--preset NAME is required (or --resume / --report-only for the comparisons in --out)")
    reads = "--report-only" if args.report_only else "--resume" if args.resume else None
    check_out_folder(out, explicit=True, existing=reads)
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    if not args.report_only:
        out.mkdir(exist_ok=True)
        for seed in seeds:
            folder = seed_dir(out, seed)
            again = args.resume and (folder / COMPARE_FILE).exists()
            if not again and args.preset is None:
                raise TrainError(f"--resume: seed {seed} has no comparison in {folder}: add --preset NAME to start it")
            overrides = list(args.overrides) if again else [*args.overrides, f"train.seed={seed}"]
            say(f"seed {seed}: {'resuming' if again else 'training'} the comparison in {folder}")
            try:
                summary = compare(
                    None if again else args.preset, folder, overrides, max_steps=args.max_steps, resume=again
                )
            except Interrupted as interrupted:
                return _interrupted("compare", out, interrupted, interrupted.run_dir / CHECKPOINT)
            if summary["stopped_by"]:
                seeds_text = ",".join(map(str, seeds))
                print(
                    f"sigattn compare: resume with: {resume_command('compare', out)} --seeds {seeds_text}",
                    file=sys.stderr,
                )
                return _stop_status(signal.Signals[summary["stopped_by"]])
    summary = write_seed_comparison(out, seeds)
    if args.json:
        print(strict_json(summary, indent=2))
    for attn in ATTNS:
        loss = summary[attn]["final_val_loss"]
        half = "" if loss["ci95"] is None else f" ± {(loss['ci95'][1] - loss['ci95'][0]) / 2:.4f}"
        say(f"{attn:<8} final val loss {loss['mean']:.4f}{half} over {len(seeds)} seeds")
    difference = summary["difference"]["final_val_loss"]
    noise = {None: "one seed: no interval", True: "within the seeds' noise", False: "beyond the seeds' noise"}
    say(f"sigmoid - softmax: {difference['mean']:+.4f} ({noise[summary['within_noise']]})")
    say(f"wrote {out / 'summary.json'} and report.md")
    return 0


# ------------------------------------------------------------------------------------------- settings


def _list_settings(config: RunConfig) -> int:
    flat = config.to_dict()
    for name in setting_names(config.task):
        section, key = name.split(".")
        print(f"{name}={override_text(flat[section][key])}")
    return 0


def override_text(value) -> str:
    """A setting's value as an override writes it: none, true/false, comma-separated values, or as is."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def saved_run_config(out: Path, overrides: list[str], *, attn: str | None = None, max_steps: int | None = None):
    """The configuration of the run saved in ``out`` (its config.json), with ``overrides``, ``attn`` and
    ``max_steps`` applied on top (whether the run may continue with them is ``trainer.resumed_config``'s
    decision)."""
    path = out / "config.json"
    if not path.is_file():
        raise TrainError(
            f"--resume: no {path}: give the --out of a run (the folder holding its config.json and {CHECKPOINT}), "
            "or start a run with --preset"
        )
    try:
        raw = json.loads(path.read_text())
        saved = RunConfig.from_dict(raw)
    except (OSError, UnicodeDecodeError, ValueError) as error:  # ConfigError is a ValueError
        raise TrainError(
            f"cannot read {path} ({error}): restore it, or give --preset and the run's settings with --resume"
        ) from None
    extra = list(overrides)
    if attn is not None:
        extra.append(f"model.attn={attn}")
    if max_steps is not None:
        extra.append(f"train.max_steps={max_steps}")
    return RunConfig.from_dict(saved.to_dict(), extra) if extra else saved


# ---------------------------------------------------------------------------------------- output folder


def check_out_folder(out: Path, *, explicit: bool, existing: str | None = None, option: str = "--out") -> None:
    """Refuses (TrainError) an output folder that is a file, a folder that must exist (``existing``: the flag
    that reads it, --resume or --report-only) and does not, and an explicit folder whose parent does not exist
    (a mistyped path is not created silently)."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"{option} {out} is a file, not a folder: choose another {option} (or move the file)")
    if existing is not None:
        if not out.is_dir():
            raise TrainError(f"{existing}: no folder {out}: give the {option} of the run (or comparison) to read")
    elif explicit and not out.exists() and not out.parent.exists():
        raise TrainError(
            f"{option} {out}: the folder {out.parent} does not exist: create it first (mkdir -p "
            f"{shlex.quote(str(out.parent))}) or choose another {option}"
        )


def resume_command(command: str, out: Path) -> str:
    """The command line that continues the run (or comparison) in ``out``, as this one was started."""
    tail = f"{command} --resume --out {shlex.quote(str(out))}"
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        nodes = int(os.environ.get("WORLD_SIZE", "1")) // max(processes, 1)
        launch = f"torchrun --nproc-per-node {processes} -m sigattn.cli {tail}"
        return launch + (" (on each node, with this launch's rendezvous options)" if nodes > 1 else "")
    program = "sigattn" if shutil.which("sigattn") else f"{shlex.quote(sys.executable)} -m sigattn.cli"
    return f"{program} {tail}"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone reports


def _stop_status(signum: int) -> int:
    """The exit status of a command stopped by ``signum``: 128 + its number, as a shell reports it."""
    return 128 + int(signum)


def _interrupted(command: str, out: Path, interrupted: Interrupted, checkpoint: Path) -> int:
    """A second signal stopped the command at once: say what is left and how to go on."""
    if checkpoint.exists():
        then = f"the run keeps its last checkpoint ({checkpoint}): resume with: {resume_command(command, out)}"
    else:
        then = f"no checkpoint was written: start again without --resume (or delete {out})"
    print(f"sigattn {command}: stopped at once by a second {interrupted}; {then}", file=sys.stderr)
    return _stop_status(interrupted.signum)


# ---------------------------------------------------------------------------------------------- train


def run_train(args: argparse.Namespace) -> int:
    if args.preset is None and not args.resume:
        raise TrainError("--preset NAME is required (or --resume --out DIR to continue a run)")
    if args.preset is None and args.out is None:
        raise TrainError("--resume needs --out DIR, the folder of the run to continue")
    if args.preset is None:  # --resume --out DIR: the run's own config.json
        out = Path(args.out)
        check_out_folder(out, explicit=True, existing="--resume")
        config = saved_run_config(out, args.overrides, attn=args.attn, max_steps=args.max_steps)
    else:
        config = build_config(args.preset, args.overrides, attn=args.attn, max_steps=args.max_steps)
        out = Path(args.out) if args.out else Path("runs") / f"{Path(args.preset).stem}-{config.model.attn}"
    if args.list_settings:
        return _list_settings(config)
    if args.preset is not None:
        check_out_folder(out, explicit=args.out is not None, existing="--resume" if args.resume else None)
    try:
        result = train(config, out, resume=args.resume)
    except Interrupted as interrupted:
        return _interrupted("train", out, interrupted, out / CHECKPOINT)
    if not _is_main_process():
        return _stop_status(signal.Signals[result.stopped_by]) if result.stopped_by else 0
    print(strict_json(result.to_dict(), indent=2))
    if result.stopped_by:
        print(f"sigattn train: resume with: {resume_command('train', out)}", file=sys.stderr)
        return _stop_status(signal.Signals[result.stopped_by])
    return 0


# -------------------------------------------------------------------------------------------- compare


def run_compare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.seeds is not None and not args.list_settings:
        return _run_seeds(args, out)
    if args.list_settings:
        if args.preset is None:
            raise TrainError("--list-settings needs --preset NAME")
        return _list_settings(build_config(args.preset, args.overrides, max_steps=args.max_steps))
    if args.preset is None and not (args.resume or args.report_only):
        raise TrainError("--preset NAME is required (or --resume to continue the comparison in --out)")
    reads = "--report-only" if args.report_only else "--resume" if args.resume else None
    check_out_folder(out, explicit=True, existing=reads)
    if args.report_only:
        summary = write_comparison(out, None if args.preset is None else Path(args.preset).stem, args.overrides)
    else:
        try:
            summary = compare(args.preset, out, args.overrides, max_steps=args.max_steps, resume=args.resume)
        except Interrupted as interrupted:
            return _interrupted("compare", out, interrupted, interrupted.run_dir / CHECKPOINT)
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    if args.json:
        print(strict_json(summary, indent=2))
    for attn in ATTNS:
        r = summary[attn]
        if r is None:
            say(f"{attn:<8} not started")
            continue
        val = "n/a" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}"
        speed = "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        state = f"   ({summary['incomplete'][attn]})" if attn in summary["incomplete"] else ""
        say(f"{attn:<8} final val loss {val}   {speed} tokens/s   {r['train_seconds']:.1f} s{state}")
    if "val_loss_gap" in summary:
        say(f"sigmoid vs softmax: val loss {summary['val_loss_gap']:+.2%}")
    say(f"wrote {out / 'summary.json'}, report.md and plots")
    if summary["stopped_by"]:
        print(f"sigattn compare: resume with: {resume_command('compare', out)}", file=sys.stderr)
        return _stop_status(signal.Signals[summary["stopped_by"]])
    return 0
