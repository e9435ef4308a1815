"""What a run trains on: a language model on text, or a ViT on images.

A task loads its data, builds its model (filling in the model fields the data decides), hands out the
training batch of each step, evaluates, and picks the input the diagnostics run on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..data import (
    ImageBatches,
    TokenBatches,
    build_tokenizer,
    eval_windows,
    load_digits,
    load_npz,
    load_pycode,
    load_shakespeare,
    read_text_file,
    roots_from_path,
    split_images,
    tokenizer_from_state,
)
from ..models import GPT, ViT
from .config import DataConfig, RunConfig

PROBE_ROWS = 8  # sequences (or images) the diagnostics run on


def _evaluate(model: nn.Module, batches, device, autocast) -> tuple[float, Tensor]:
    """The mean loss over (input, target) batches and the argmax of the last logits axis (on the CPU)."""
    total, count, predictions = 0.0, 0, []
    for x, y in batches:
        with autocast():
            logits, loss = model(x.to(device), y.to(device))
        total += loss.item() * len(x)
        count += len(x)
        predictions.append(logits.argmax(dim=-1).cpu())
    return total / count, torch.cat(predictions)


class LMTask:
    """Next-token prediction on a text: the Shakespeare corpus, any UTF-8 file, or the Python-source corpus.

    A text is tokenised whole and the last ``val_fraction`` of its tokens is the validation split; the
    Python-source corpus (``sigattn.data.pycode``) comes tokenised and split by file, and its ``manifest``
    says what it holds (None for the others). Validation runs at the training context (``model.block_size``)
    and at each of ``train.eval_context_lengths``, on fixed windows spread over the validation split."""

    def __init__(self, config: RunConfig, state: dict | None = None):
        data, settings = config.data, config.train
        self.manifest: dict | None = None
        if data.dataset == "pycode":
            train, val = self._load_pycode(data, state)
        else:
            train, val = self._load_text(data, state)
        self.model_config = dataclasses.replace(config.model, vocab_size=self.tokenizer.vocab_size)
        block_size = self.model_config.block_size
        self.context = block_size
        self.batches = TokenBatches(train, settings.batch_size, block_size, settings.seed)
        self.tokens_per_batch = settings.batch_size * block_size
        self.context_lengths = sorted({block_size, *settings.eval_context_lengths})
        # At most a training batch's tokens per evaluation batch: at 4x the context a full batch of rows made
        # code-gpt's float32 logits 16 GiB and ran an H100 (80 GB) out of memory (2026-12-07).
        self.eval_sets = {
            n: eval_windows(val, n, settings.eval_windows, max(1, self.tokens_per_batch // n))
            for n in self.context_lengths
        }
        self.description += f": {len(train):,} training and {len(val):,} validation {data.tokenizer} tokens"

    def _load_text(self, data: DataConfig, state: dict | None) -> tuple[Tensor, Tensor]:
        """The training and validation tokens of a text; sets the tokenizer and description."""
        if data.dataset == "shakespeare":
            text = load_shakespeare(data.path)
            self.description = "the works of Shakespeare" if data.path is None else f"text from {data.path}"
        else:
            text = read_text_file(data.path)
            self.description = f"text from {data.path}"
        self.text_sha256 = hashlib.sha256(text.encode()).hexdigest()
        _check_same_data(state, "text_sha256", self.text_sha256, "the text", self.description, "is not the one")
        if state is not None:
            self.tokenizer = tokenizer_from_state(state["tokenizer"])
        else:
            self.tokenizer = build_tokenizer(data.tokenizer, text, data.vocab_size)
        tokens = torch.tensor(self.tokenizer.encode(text), dtype=torch.int64)
        num_val = int(len(tokens) * data.val_fraction)
        return tokens[: len(tokens) - num_val], tokens[len(tokens) - num_val :]

    def _load_pycode(self, data: DataConfig, state: dict | None) -> tuple[Tensor, Tensor]:
        """The Python-source corpus's splits (built into the cache folder if it is not there); sets the
        tokenizer, description and manifest. A resumed run needs the corpus it started with."""
        corpus = load_pycode(
            roots_from_path(data.path),
            max_bytes=data.max_bytes,
            vocab_size=data.vocab_size,
            val_fraction=data.val_fraction,
        )
        if state is not None and state.get("pycode_fingerprint") != corpus.fingerprint:
            raise ValueError(
                f"the pycode corpus built here (fingerprint {corpus.fingerprint[:12]}) is not the one the run started "
                f"with ({str(state.get('pycode_fingerprint'))[:12]}, its data.json): the environment's files changed"
            )
        self.tokenizer, self.description, self.manifest = corpus.tokenizer, corpus.description, corpus.manifest
        # int32 copies: torch wants writable memory (the memmaps are read-only) and has long indexed uint16
        # in few operations; 4 bytes a token keep 100M tokens at 400 MB a process (batches are cut as int64).
        return tuple(torch.from_numpy(corpus.tokens(split).astype(np.int32)) for split in ("train", "val"))

    def build_model(self) -> GPT:
        """A freshly initialised model (its data-derived fields filled in)."""
        return GPT(self.model_config)

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The (inputs, targets) of step ``step``, on the CPU; a function of (seed, step) only."""
        return self.batches.batch(step)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device, autocast: Callable = contextlib.nullcontext) -> dict:
        """``val_loss`` at the training context and ``val_loss_by_context`` (keys: context lengths)."""
        by_context = {str(n): _evaluate(model, batches, device, autocast)[0] for n, batches in self.eval_sets.items()}
        return {"val_loss": by_context[str(self.context)], "val_loss_by_context": by_context}

    def probe_input(self) -> Tensor:
        """The input the diagnostics run on: the first validation windows at the training context."""
        return self.eval_sets[self.context][0][0][:PROBE_ROWS]

    def state(self) -> dict:
        """What a checkpoint keeps to rebuild this task exactly: the tokenizer (and which pycode corpus)."""
        if self.manifest is not None:
            return {"tokenizer": self.tokenizer.state(), "pycode_fingerprint": self.manifest["fingerprint"]}
        return {"tokenizer": self.tokenizer.state(), "text_sha256": self.text_sha256}


class ImageTask:
    """Image classification: scikit-learn's digits or an .npz file; ``val_fraction`` held out."""

    def __init__(self, config: RunConfig, state: dict | None = None):
        data, settings = config.data, config.train
        if data.dataset == "digits":
            images, labels = load_digits()
            self.description = "scikit-learn digits"
        else:
            try:
                images, labels = load_npz(data.path)
            except (FileNotFoundError, ValueError) as error:
                raise ValueError(f"data.path: {error}") from None
            self.description = f"images from {data.path}"
        self.images_sha256 = _arrays_sha256(images, labels)
        _check_same_data(state, "images_sha256", self.images_sha256, "the images", self.description, "are not the ones")
        self.split = split_images(images, labels, data.val_fraction, settings.seed)
        channels, size = self.split.train_images.shape[1], self.split.train_images.shape[2]
        self.model_config = dataclasses.replace(
            config.model, image_size=size, channels=channels, n_classes=self.split.num_classes
        )
        self.batches = ImageBatches(
            self.split.train_images, self.split.train_labels, settings.batch_size, settings.seed
        )
        self.tokens_per_batch = settings.batch_size * self.model_config.seqlen
        self.eval_batches = list(
            zip(
                self.split.val_images.split(settings.batch_size),
                self.split.val_labels.split(settings.batch_size),
                strict=True,
            )
        )
        self.description += (
            f": {len(self.split.train_images)} training and {len(self.split.val_images)} validation images"
        )

    def build_model(self) -> ViT:
        """A freshly initialised model (its data-derived fields filled in)."""
        return ViT(self.model_config)

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The (inputs, targets) of step ``step``, on the CPU; a function of (seed, step) only."""
        return self.batches.batch(step)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device, autocast: Callable = contextlib.nullcontext) -> dict:
        """``val_loss`` and ``val_acc`` over all validation images."""
        loss, predictions = _evaluate(model, self.eval_batches, device, autocast)
        return {"val_loss": loss, "val_acc": (predictions == self.split.val_labels).float().mean().item()}

    def probe_input(self) -> Tensor:
        """The input the diagnostics run on: the first validation images."""
        return self.split.val_images[:PROBE_ROWS]

    def state(self) -> dict:
        """What a checkpoint keeps to check the data on resume: the images' sha256 (the split is a function of
        the seed)."""
        return {"images_sha256": self.images_sha256}


def _check_same_data(state: dict | None, key: str, digest: str, data: str, description: str, are_not: str) -> None:
    """A resumed run continues exactly only on the data it started with: refuses a checkpoint's task ``state``
    whose ``key`` holds another sha256 than ``digest`` (checkpoints older than the key hold none: they resume
    unchecked). ``data`` ("the text") and ``are_not`` ("is not the one") word the error."""
    saved = None if state is None else state.get(key)
    if saved is not None and saved != digest:
        raise ValueError(
            f"{data} read now ({description}, sha256 {digest[:12]}) {are_not} the run started with "
            f"(sha256 {saved[:12]}): the data changed; restore it, or start a new run"
        )


def _arrays_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the images and labels as loaded, shapes included: the arrays, not the .npz's bytes, which
    change when the same arrays are saved again (the zip entries' dates)."""
    digest = hashlib.sha256(repr((images.shape, labels.shape)).encode())
    for array in (images, labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def make_task(config: RunConfig, state: dict | None = None) -> LMTask | ImageTask:
    """The task of ``config.task``; ``state`` (from a checkpoint) restores what was derived from the data."""
    return LMTask(config, state) if config.task == "lm" else ImageTask(config, state)
