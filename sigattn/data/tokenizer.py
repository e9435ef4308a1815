"""Tokenizers: characters, UTF-8 bytes, or a byte-level BPE trained locally with the ``tokenizers`` library.

Each one encodes a string to a list of ids and decodes it back exactly (``decode(encode(s)) == s``; for
characters, only for strings of characters it has seen). ``state()`` is a JSON-able dict and
``tokenizer_from_state`` rebuilds the tokenizer from it, so a run saves its tokenizer next to its model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

TOKENIZER_KINDS = ("char", "byte", "bpe")


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def state(self) -> dict: ...


class CharTokenizer:
    """One id per distinct character of the training text, in code-point order."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(self.chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as error:
            raise ValueError(f"character {error.args[0]!r} is not in the character vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def state(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


class ByteTokenizer:
    """The UTF-8 bytes of the text: 256 ids, any text."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def state(self) -> dict:
        return {"kind": self.kind}


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("the BPE tokenizer needs the 'tokenizers' package: pip install 'sigattn[train]'") from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (GPT-2's pre-tokenisation, all 256 bytes in the base alphabet), so any text
    round-trips. Build one with ``BPETokenizer.train``."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learns ``vocab_size - 256`` merges from the lines of ``text``, one string or several (the files of a
        corpus, streamed to the library rather than joined); deterministic for given texts."""
        tk = _import_tokenizers()
        if vocab_size < 256:
            raise ValueError(f"vocab_size of a byte-level BPE must be at least 256, got {vocab_size}")
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        texts = [text] if isinstance(text, str) else text
        tokenizer.train_from_iterator((line for t in texts for line in t.splitlines(keepends=True)), trainer)
        return cls(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text, on the library's threads."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def state(self) -> dict:
        return {"kind": self.kind, "tokenizer": self._tokenizer.to_str()}


def build_tokenizer(kind: str, text: str, vocab_size: int = 512) -> Tokenizer:
    """A tokenizer of ``kind`` ("char", "byte" or "bpe") for ``text``; ``vocab_size`` is BPE's."""
    if kind == "char":
        return CharTokenizer(text)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size)
    raise ValueError(f"tokenizer must be one of {', '.join(map(repr, TOKENIZER_KINDS))}; got {kind!r}")


def tokenizer_from_state(state: dict) -> Tokenizer:
    """The tokenizer that ``state()`` described."""
    kind = state.get("kind")
    if kind == "char":
        return CharTokenizer(state["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer(_import_tokenizers().Tokenizer.from_str(state["tokenizer"]))
    raise ValueError(f"tokenizer state must have kind 'char', 'byte' or 'bpe'; got {kind!r}")
