"""Data for the training recipes: tokenizers, the Shakespeare corpus, images, and resumable batches."""

from .batches import ImageBatches, TokenBatches, eval_windows, step_generator
from .images import ImageSplit, load_digits, load_npz, split_images
from .shakespeare import CorpusUnavailableError, cache_dir, load_shakespeare, read_text_file
from .tokenizer import (
    TOKENIZER_KINDS,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    tokenizer_from_state,
)

__all__ = [
    "TOKENIZER_KINDS",
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "CorpusUnavailableError",
    "ImageBatches",
    "ImageSplit",
    "TokenBatches",
    "Tokenizer",
    "build_tokenizer",
    "cache_dir",
    "eval_windows",
    "load_digits",
    "load_npz",
    "load_shakespeare",
    "read_text_file",
    "split_images",
    "step_generator",
    "tokenizer_from_state",
]
