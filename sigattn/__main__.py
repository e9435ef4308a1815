"""``python -m sigattn`` and the ``sigattn`` command's entry point.

``sigattn --version`` and ``sigattn --help`` are answered here, without importing torch (over a second of a
2-core CPU) or the modules that build every subcommand's options; every other command line goes to
``sigattn.cli.main``, which builds the full parser.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__

# The subcommands and their one-line help, written here alone: ``sigattn.cli.build_parser`` registers each
# with this help, and the top-level --help lists them. tests/test_import.py checks that a command added
# there is listed here (the two helps are equal).
COMMANDS = {
    "info": "versions, device and backend choice of each public function",
    "example": "run a small attention and check it against the reference",
    "bench": "benchmark against softmax SDPA and FlexAttention (CUDA)",
    "train": "train a preset with sigmoid or softmax attention",
    "compare": "train a preset with both attentions and compare them",
    "data": "build a training corpus into the cache folder and print its manifest",
    "convert": "switch a pretrained transformers model to sigmoid attention",
    "experiment": "run an experiment that tests a paper's claim (result.json, report.md, plots)",
    "completion": "print a shell completion script (bash or zsh)",
}
_ANSWERED_HERE = ("-h", "--help", "--version")


def top_level_parser() -> argparse.ArgumentParser:
    """The parser of ``sigattn`` without its subcommands' options: enough for --version and --help."""
    parser = argparse.ArgumentParser(prog="sigattn", description="Sigmoid self-attention for PyTorch.")
    parser.add_argument("--version", action="version", version=f"sigattn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        commands.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``sigattn`` with ``argv`` (default: the command line); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in _ANSWERED_HERE:
        top_level_parser().parse_args(argv)  # prints the help, the version or the usage error, and exits
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
