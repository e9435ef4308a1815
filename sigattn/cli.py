"""The ``sigattn`` command.

    sigattn info [--json]   versions, device, and the backend each public function would use (and why not
                            the others)
    sigattn example         a small attention through the public API, checked against the exact reference
    sigattn bench ...       speed and memory against softmax SDPA and FlexAttention (``sigattn.bench``)
    sigattn train ...       train a preset (GPT or ViT) with sigmoid or softmax attention (``sigattn.train``)
    sigattn compare ...     train a preset with both attentions; summary.json, report.md and plots
    sigattn data pycode [--max-bytes N] [--vocab-size N] [--val-fraction F] [--path DIRS] [--rebuild]
                            build the Python-source corpus of the environment into the cache folder (or
                            find it there) and print its manifest as JSON (``sigattn.data.pycode``)
    sigattn convert ...     switch a pretrained transformers model to sigmoid attention, with a calibrated
                            bias (``sigattn.integrations.convert``)
    sigattn experiment NAME [--quick | --size SIZE] [--out DIR] [--json]
                            run an experiment that tests a paper's claim: result.json, report.md, plots
                            (``sigattn.experiments``)
    sigattn completion bash|zsh
                            a shell completion script (``sigattn.completion``)

Each subcommand is one entry of ``build_parser``: its options and the function that runs it, which returns
the exit status. ``--help`` on any subcommand lists its options.

Exit status: 0, 1 for a failed check, 2 for a usage error or a problem the user can fix (one line on stderr
naming what is wrong and what to do, never a traceback), 128 + the signal's number for a command stopped by
SIGINT (130) or SIGTERM (143), and 141 when the reader of stdout went away (``sigattn info --json | head``),
as a shell reports a process killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from . import __version__, backends, completion
from . import experiments as experiments_module
from .__main__ import COMMANDS
from .backends import (
    BACKENDS,
    ENV_VAR,
    AttnCall,
    BackendNotSupportedError,
    explain,
    kernels_for_gpu,
    kernels_import_error,
    requested_backend,
)
from .bench import command as bench_command
from .data import CorpusUnavailableError, pycode
from .experiments.common import check_size
from .experiments.index import write_index
from .functional import sigmoid_attn_func
from .integrations import convert as convert_command
from .ops.sigmoid_attn.reference import Mask, sigmoid_attn_reference
from .runinfo import cpu_name, versions
from .testing.tolerance import ATOL, allowed_error, max_error
from .train import commands as train_commands

# The example input of `info` and `example`: a causal language-model layer, small enough for any CPU.
BATCH, SEQLEN, HEADS, HEADDIM = 2, 256, 8, 64


class CommandError(Exception):
    """A problem the user can fix (a bad setting); main prints it and exits with status 2."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        status = args.run(args)
        sys.stdout.flush()  # a reader that went away shows here, not at the interpreter's exit
        return status
    except CommandError as error:
        print(f"sigattn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _discard_stdout()
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as interrupt:  # a signal outside a run's steps (the runs handle their own)
        signum = getattr(interrupt, "signum", signal.SIGINT)
        print(f"sigattn {args.command}: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum


def _discard_stdout() -> None:
    """Points stdout at /dev/null, so that flushing what is left of it at exit raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sigattn", description="Sigmoid self-attention for PyTorch.")
    parser.add_argument("--version", action="version", version=f"sigattn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help=COMMANDS["info"])
    info.add_argument("--json", action="store_true", help="print the same as JSON")
    info.set_defaults(run=run_info)

    example = commands.add_parser("example", help=COMMANDS["example"])
    example.set_defaults(run=run_example)

    bench = commands.add_parser("bench", help=COMMANDS["bench"])
    bench_command.add_arguments(bench)
    bench.set_defaults(run=bench_command.run)

    train = commands.add_parser("train", help=COMMANDS["train"])
    train_commands.add_train_arguments(train)
    train.set_defaults(run=user_errors(train_commands.run_train))

    compare = commands.add_parser("compare", help=COMMANDS["compare"])
    train_commands.add_compare_arguments(compare)
    compare.set_defaults(run=user_errors(train_commands.run_compare))

    data = commands.add_parser("data", help=COMMANDS["data"])
    data.add_argument(
        "dataset", choices=["pycode"], help="the corpus: pycode, the Python source files of the environment"
    )
    data.add_argument(
        "--max-bytes", type=int, metavar="N", help="a fixed slice of at most N bytes of source (default: all)"
    )
    data.add_argument(
        "--vocab-size",
        type=int,
        default=pycode.DEFAULT_VOCAB_SIZE,
        metavar="N",
        help="the BPE's vocabulary (%(default)s)",
    )
    data.add_argument(
        "--val-fraction",
        type=float,
        default=pycode.DEFAULT_VAL_FRACTION,
        metavar="F",
        help="the fraction of files, by content hash, held out for validation (%(default)s)",
    )
    data.add_argument(
        "--path",
        metavar="DIRS",
        help=f"the folders to read, separated by {os.pathsep!r} as in data.path (default: the environment's stdlib "
        "and site-packages)",
    )
    data.add_argument("--rebuild", action="store_true", help="build even if the cache folder holds this corpus")
    data.set_defaults(run=run_data)

    convert = commands.add_parser("convert", help=COMMANDS["convert"])
    convert_command.add_arguments(convert)
    convert.set_defaults(run=run_convert)

    experiment = commands.add_parser("experiment", help=COMMANDS["experiment"])
    experiment.add_argument(
        "name",
        choices=list(experiments_module.EXPERIMENTS),
        metavar="NAME",
        help=f"one of: {', '.join(experiments_module.EXPERIMENTS)}",
    )
    sizes = experiment.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="a reduced setting: minutes on a 2-core CPU")
    sizes.add_argument(
        "--size",
        choices=experiments_module.SIZES,
        help="the setting: full (the default), quick (= --quick), test (seconds) or gpu (minutes on one GPU, "
        "the experiments whose claim is about scale: bias-ablation)",
    )
    experiment.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default: results/NAME, results/NAME-gpu with --size gpu, "
        "runs/experiments/NAME-SIZE for quick and test)",
    )
    experiment.add_argument(
        "--json",
        action="store_true",
        help="print the result (result.json's contents) as JSON on stdout; the progress lines go to stderr",
    )
    experiment.set_defaults(run=run_experiment)

    shell = commands.add_parser("completion", help=COMMANDS["completion"])
    shell.add_argument("shell", choices=completion.SHELLS, help="the shell: " + ", ".join(completion.SHELLS))
    shell.set_defaults(run=run_completion)
    return parser


def run_experiment(args: argparse.Namespace) -> int:
    """Runs the experiment; a full or gpu run into the default folder (results/NAME, results/NAME-gpu) also
    rewrites results/README.md."""
    size = "quick" if args.quick else args.size or "full"
    default = {"full": f"results/{args.name}", "gpu": f"results/{args.name}-gpu"}.get(
        size, f"runs/experiments/{args.name}-{size}"
    )
    try:
        check_size(size, experiments_module.EXPERIMENTS[args.name])
    except ValueError as error:
        raise CommandError(f"--size: {error}") from None
    command = " ".join(["sigattn", *args.argv])
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    try:
        train_commands.check_out_folder(Path(args.out or default), explicit=args.out is not None)
        experiments_module.run(args.name, args.out or default, size=size, command=command, log=say)
    except train_commands.USER_ERRORS as error:  # e.g. the full setting's corpus cannot be fetched
        raise CommandError(error) from None
    if args.json:
        print((Path(args.out or default) / "result.json").read_text(), end="")
    if args.out is None and size in ("full", "gpu"):
        say(f"updated {write_index('results', experiments_module.EXPERIMENTS)}")
    return 0


def run_data(args: argparse.Namespace) -> int:
    """Builds (or finds) the corpus; its manifest on stdout, where it is and how long it took on stderr."""
    started = time.perf_counter()
    try:
        corpus = pycode.load_pycode(
            pycode.roots_from_path(args.path),
            max_bytes=args.max_bytes,
            vocab_size=args.vocab_size,
            val_fraction=args.val_fraction,
            rebuild=args.rebuild,
        )
    except (ValueError, ImportError, CorpusUnavailableError) as error:
        raise CommandError(error) from None
    print(json.dumps(corpus.manifest, indent=2))
    print(f"sigattn data: {corpus.folder} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


def run_completion(args: argparse.Namespace) -> int:
    print(completion.script(build_parser(), args.shell), end="")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    try:
        return convert_command.run(args)
    except convert_command.USER_ERRORS as error:
        raise CommandError(error) from None


def user_errors(run):
    """``run`` with the training errors a user can fix (bad preset, setting, data) turned into CommandError."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except train_commands.USER_ERRORS as error:
            raise CommandError(error) from None

    return wrapped


# ---------------------------------------------------------------------------------------------- info


def default_device_dtype() -> tuple[torch.device, torch.dtype]:
    """The device and dtype of a typical call: bf16 on the GPU, fp32 on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def checked_requested_backend() -> str:
    try:
        return requested_backend()
    except ValueError as error:  # a $SIGATTN_BACKEND that names no backend
        raise CommandError(error) from None


def example_calls(device: torch.device, dtype: torch.dtype) -> dict[str, AttnCall]:
    """One causal call of each public function, as functional.py describes it to the dispatcher:
    flash layout (B, S, H, D), default scale and bias. varlen packs two sequences of 300 and 212 tokens;
    kvcache decodes one token against full caches; the SDPA function aligns the mask top-left."""
    q, k, v = (torch.randn(BATCH, SEQLEN, HEADS, HEADDIM, device=device, dtype=dtype) for _ in range(3))
    options = dict(scale=1 / math.sqrt(HEADDIM), bias=None, alibi_slopes=None, deterministic=False)
    causal, top_left = Mask(causal=True), Mask(causal=True, top_left=True)
    cu_seqlens = torch.tensor([0, 300, BATCH * SEQLEN], dtype=torch.int32, device=device)
    full = torch.full((BATCH,), SEQLEN, dtype=torch.int32, device=device)
    packed = [t.flatten(0, 1) for t in (q, k, v)]  # [B * S, H, D]
    return {
        "sigmoid_attn_func": AttnCall("dense", q, k, v, mask=causal, **options),
        "sigmoid_attn_varlen_func": AttnCall(
            "varlen",
            *packed,
            mask=causal,
            **options,
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_k=cu_seqlens,
            max_seqlen_q=300,
            max_seqlen_k=300,
        ),
        "sigmoid_attn_with_kvcache": AttnCall("kvcache", q[:, -1:], k, v, mask=causal, **options, seqlens_k=full),
        "scaled_dot_product_sigmoid_attention": AttnCall("dense", q, k, v, mask=top_left, **options),
    }


def collect_info() -> dict:
    requested = checked_requested_backend()
    device, dtype = default_device_dtype()
    capability = torch.cuda.get_device_capability() if device.type == "cuda" else None
    if capability is not None:
        major, minor = capability
        device_info = {"type": "cuda", "name": torch.cuda.get_device_name(), "capability": f"{major}.{minor}"}
    else:
        device_info = {"type": "cpu", "name": cpu_name(), "capability": None}
    calls = example_calls(device, dtype)
    return {
        "versions": versions("numpy"),
        "device": device_info,
        # Whether the Triton kernels import here (None: they do), and which kernels this device runs.
        "kernels": {"import_error": kernels_import_error(), "on_this_device": kernels_for_gpu(capability)},
        "env": {name: os.environ.get(name) for name in ("TRITON_INTERPRET", ENV_VAR)},
        "requested_backend": requested,
        "backends": list(BACKENDS),
        "auto_order": list(backends.AUTO_ORDER),
        "example": {
            "dtype": str(dtype).removeprefix("torch."),
            "device": device.type,
            "shape": [BATCH, SEQLEN, HEADS, HEADDIM],
            "causal": True,
        },
        "functions": {name: explain(call) for name, call in calls.items()},
    }


def format_info(info: dict) -> str:
    device = info["device"]
    if device["type"] == "cuda":
        device_line = f"cuda: {device['name']} (compute capability {device['capability']})"
    else:
        device_line = f"cpu: {device['name']} (CUDA not available)"
    example, kernels = info["example"], info["kernels"]
    lines = [
        *(f"{name:<18}{version or 'not installed'}" for name, version in info["versions"].items()),
        f"{'device':<18}{device_line}",
        f"{'kernels':<18}{kernels['import_error'] or 'the Triton kernels import'}",
        f"{'':<18}{kernels['on_this_device']}",
        *(f"{name:<18}{value if value is not None else '(unset)'}" for name, value in info["env"].items()),
        f"{'backends':<18}{', '.join(info['backends'])} (auto tries: {', '.join(info['auto_order'])})",
        f"{'requested backend':<18}{info['requested_backend']}",
        "",
        f"Backend for a causal {example['dtype']} call on {example['device']}, "
        f"(batch, seqlen, heads, headdim) = {tuple(example['shape'])}:",
    ]
    for name, choice in info["functions"].items():
        kernels = ", ".join(f"{direction}: {kernel}" for direction, kernel in choice["kernels"].items())
        chosen = choice["backend"] or "none: the call would raise"
        lines.append(f"  {name:<38} -> {chosen}" + (f" ({kernels})" if kernels else ""))
        lines += [f"      not {other}: {'; '.join(why)}" for other, why in choice["why_not"].items()]
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# ------------------------------------------------------------------------------------------- example


def run_example(args: argparse.Namespace) -> int:
    """Forward and backward of sigmoid_attn_func on the default device, checked with the project's
    tolerance rule (``sigattn.testing.tolerance``): error against the float64 reference <= 2 x the error of
    PyTorch in the same precision + ATOL (for values both get exactly right). Exit status 1 if a check
    fails."""
    requested = checked_requested_backend()
    device, dtype = default_device_dtype()
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(BATCH, SEQLEN, HEADS, HEADDIM, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    call = example_calls(device, dtype)["sigmoid_attn_func"]
    backend = explain(call)["backend"]
    print(
        f"sigmoid_attn_func(q, k, v, causal=True) on {device.type}, {str(dtype).removeprefix('torch.')}, "
        f"backend {backend!r} ({requested} requested)"
    )
    print(f"  q, k, v: {tuple(q.shape)} (batch, seqlen, heads, headdim)")

    try:
        out = sigmoid_attn_func(q, k, v, causal=True)
    except BackendNotSupportedError as error:  # a forced backend that cannot run this input
        raise CommandError(error) from None
    dout = torch.randn_like(out)
    truth = sigmoid_attn_reference(q, k, v, causal=True, upcast=True)
    same_precision = sigmoid_attn_reference(q, k, v, causal=True, upcast=False)
    print(f"  out:     {tuple(out.shape)}")
    outputs = ((out, dout), (truth, dout.double()), (same_precision, dout))
    # grads[i][j]: gradient j (dq, dk, dv) of output i (ours, the exact truth, PyTorch in the same precision)
    grads = [torch.autograd.grad(o, (q, k, v), g) for o, g in outputs]
    results = {"out": (out, truth, same_precision)}
    results.update({name: tuple(g[i] for g in grads) for i, name in enumerate(("dq", "dk", "dv"))})
    ok = True
    for name, (ours, exact, pytorch) in results.items():
        error, baseline = max_error(ours, exact), max_error(pytorch, exact)
        passed = error <= allowed_error(baseline, ATOL[dtype])
        ok &= passed
        print(
            f"  max |{name} - reference| = {error:.2e}   (PyTorch {str(dtype).removeprefix('torch.')}: "
            f"{baseline:.2e})  {'ok' if passed else 'FAIL: above 2x'}"
        )
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
