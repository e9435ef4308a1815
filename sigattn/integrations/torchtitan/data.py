"""Local data for torchtitan: a tokenizer folder built from a text file, and a dataloader over that file.

Nothing is downloaded. ``write_tokenizer_assets`` trains a byte-level BPE on the text (sigattn's
``BPETokenizer``) and writes the folder torchtitan's ``HuggingFaceTokenizer`` reads from
``hf_assets_path``: ``tokenizer.json`` plus ``tokenizer_config.json`` naming the BOS/EOS tokens.

``LocalTextDataLoader`` is a torchtitan dataloader (``ParallelAwareDataloader``) over one text file. Its
documents are the file's paragraphs (split at blank lines), each encoded with BOS and EOS. Rows of
``seq_len`` tokens are yielded as torchtitan's text loader yields them, ``({"input", "positions"}, labels)``:

* ``documents=True``: documents packed into rows, inputs and labels shifted within each document and the
  positions restarting at 0 at every document (torchtitan's convention), so the model attends within
  documents (``VarlenMetadata``, ``sigmoid_attn_varlen_func``);
* ``documents=False``: one token stream cut into rows, positions ``0 .. L-1``: causal attention over the
  whole row (``sigmoid_attn_func``), and what context parallel needs.

Data-parallel rank r of N takes rows r, r + N, r + 2N, ...; the loader's state (the next row) goes into
torchtitan's checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer

from ...data.tokenizer import BPETokenizer

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"


def write_tokenizer_assets(text: str, folder: str | Path, vocab_size: int) -> Path:
    """Trains a byte-level BPE of ``vocab_size`` tokens (BOS and EOS included) on ``text`` and writes it as a
    torchtitan tokenizer folder (``hf_assets_path``); returns the folder."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty str, got {type(text).__name__} of length {len(text or '')}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258:
        raise ValueError(f"vocab_size must be an int >= 258 (256 bytes, BOS and EOS), got {vocab_size!r}")
    tokenizer = BPETokenizer.train(text, vocab_size - 2)._tokenizer
    tokenizer.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "add_bos_token": False, "add_eos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def split_documents(text: str) -> list[str]:
    """The paragraphs of ``text`` (separated by blank lines), stripped, empty ones dropped."""
    return [doc.strip() for doc in text.split("\n\n") if doc.strip()]


def tokenize_rows(
    text: str, tokenizer: BaseTokenizer, seq_len: int, *, documents: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All full rows of ``text``: inputs, labels and positions, each (rows, seq_len) int64."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    inputs: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for doc in split_documents(text):
        tokens = tokenizer.encode(doc, add_bos=True, add_eos=True)
        if documents:
            inputs += tokens[:-1]
            labels += tokens[1:]
            positions += range(len(tokens) - 1)
        else:
            inputs += tokens
    if not documents:
        labels, inputs = inputs[1:], inputs[:-1]
    rows = len(inputs) // seq_len
    if rows == 0:
        raise ValueError(f"the text has {len(inputs)} tokens: fewer than one row of seq_len={seq_len}")
    n = rows * seq_len
    as_rows = lambda xs: torch.tensor(xs[:n], dtype=torch.int64).view(rows, seq_len)
    if documents:
        pos = as_rows(positions)
        # A document cut by a row boundary continues at position 0 in the next row (torchtitan does the same).
        pos = pos - torch.where(pos[:, :1] > 0, pos[:, :1], 0) * _before_first_restart(pos)
    else:
        pos = torch.arange(seq_len).expand(rows, seq_len).clone()
    return as_rows(inputs), as_rows(labels), pos


def _before_first_restart(pos: torch.Tensor) -> torch.Tensor:
    """1 for the tokens of each row before its first position-0 token, else 0."""
    started = torch.cumsum((pos == 0).to(torch.int64), dim=1) > 0
    return (~started).to(pos.dtype)


class LocalTextDataset(IterableDataset, Stateful):
    """The rows of one local text file for one data-parallel rank (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        tokenizer: BaseTokenizer,
        seq_len: int,
        *,
        documents: bool,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        infinite: bool = True,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"dataset_path must be a text file; {str(path)!r} is not a file")
        inputs, labels, positions = tokenize_rows(path.read_text(), tokenizer, seq_len, documents=documents)
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank must be in [0, dp_world_size={dp_world_size}), got {dp_rank}")
        if inputs.shape[0] < dp_world_size:
            raise ValueError(
                f"{str(path)!r} has {inputs.shape[0]} rows of seq_len={seq_len}: fewer than the "
                f"{dp_world_size} data-parallel ranks"
            )
        self.inputs, self.labels = inputs[dp_rank::dp_world_size], labels[dp_rank::dp_world_size]
        self.positions = positions[dp_rank::dp_world_size]
        self.infinite = infinite
        self.next_row = 0

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            while self.next_row < self.inputs.shape[0]:
                i = self.next_row
                self.next_row += 1
                yield {"input": self.inputs[i], "positions": self.positions[i]}, self.labels[i]
            if not self.infinite:
                return
            self.next_row = 0

    def state_dict(self) -> dict[str, Any]:
        return {"next_row": self.next_row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_row = int(state_dict["next_row"])


class LocalTextDataLoader(ParallelAwareDataloader):
    """torchtitan dataloader over a local text file (``dataloader.dataset_path``)."""

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        dataset: str = "local_text"
        documents: bool = True
        """True: paragraphs are documents, packed with positions restarting per document (attention stays
        within a document). False: one stream, positions 0 .. L-1 per row (needed for context parallel)."""

        infinite: bool = True
        """Loop over the file forever (False: stop after one pass)."""

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: BaseTokenizer,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = 1,
        **kwargs: Any,
    ) -> None:
        if not config.dataset_path:
            raise ValueError("LocalTextDataLoader needs dataloader.dataset_path, the text file to train on; got none")
        dataset = LocalTextDataset(
            config.dataset_path,
            tokenizer,
            seq_len,
            documents=config.documents,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            infinite=config.infinite,
        )
        super().__init__(
            dataset,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            num_workers=config.num_workers,
            persistent_workers=config.persistent_workers,
            pin_memory=config.pin_memory,
            prefetch_factor=config.prefetch_factor,
            snapshot_every_n_steps=snapshot_every_n_steps,
            batch_size=local_batch_size,
        )
