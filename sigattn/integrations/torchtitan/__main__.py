"""``python -m sigattn.integrations.torchtitan tokenizer TEXT OUT [--vocab-size N]``: writes the tokenizer
folder torchtitan's ``hf_assets_path`` reads, trained on a local text file (no download)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .data import write_tokenizer_assets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sigattn.integrations.torchtitan")
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE on a text file; write a torchtitan tokenizer folder")
    tok.add_argument("text", type=Path, help="the training text file")
    tok.add_argument("out", type=Path, help="the folder to write (pass it as --hf_assets_path)")
    tok.add_argument("--vocab-size", type=int, default=2048, help="tokens, BOS and EOS included (default 2048)")
    args = parser.parse_args(argv)
    folder = write_tokenizer_assets(args.text.read_text(), args.out, args.vocab_size)
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
