"""Data for the training recipes: tokenizers, the Shakespeare corpus, the Python-source corpus of the
environment, images, and resumable batches."""

from .batches import ImageBatches, TokenBatches, eval_windows, step_generator
from .images import ImageSplit, load_digits, load_npz, split_images
from .pycode import PyCodeCorpus, default_roots, load_pycode, roots_from_path
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
    "PyCodeCorpus",
    "TokenBatches",
    "Tokenizer",
    "build_tokenizer",
    "cache_dir",
    "default_roots",
    "eval_windows",
    "load_digits",
    "load_npz",
    "load_pycode",
    "load_shakespeare",
    "read_text_file",
    "roots_from_path",
    "split_images",
    "step_generator",
    "tokenizer_from_state",
]
