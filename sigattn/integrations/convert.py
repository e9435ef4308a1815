"""Switch a pretrained softmax transformers model to sigmoid attention, to be fine-tuned from there.

    from sigattn.integrations.convert import convert_to_sigmoid

    report = convert_to_sigmoid(model, calibration_batches)   # batches: dicts of model inputs
    # model now runs attn_implementation="sigmoid" with config.sigmoid_attn_bias calibrated per head

The weights are kept; what must be chosen is the bias b of ``sigmoid(s + b)`` (s = scaled logit).

Why match the attention mass. Softmax weights of a query sum to 1: ``sum_j exp(s_ij - LSE_i) = 1``. For
``s + b << 0``, ``sigmoid(s + b) ~ exp(s + b)``, so sigmoid attention equals softmax attention for a query
whose log-sum-exp is ``-b``; a constant b cannot match every query's LSE, but it can make the mass
``M(b) = sum_j sigmoid(s_ij + b)`` equal 1 on average over the queries of calibration text, so that the
layer's output keeps the scale the next layer was trained on. ``M`` increases with b, so the solution is
unique; ``calibrate_bias`` finds it by bisection, per head (default), per layer or for the whole model.
The average is over the queries of real tokens (padding queries, which transformers' bidirectional masks
let attend, are left out: a token's query is real iff it may attend its own key).

Measured on all-MiniLM-L6-v2 (benchmarks/results/convert_minilm_cpu_2026-11-24.json): before any
fine-tuning, the mean cosine similarity of the sigmoid model's sentence embeddings to the original's is
0.94 with per-head biases, 0.72 with one per layer or one for the model, and 0.63 with
-log(max_position_embeddings); distillation reaches 0.95 after 1, 35, 40 and 55 steps respectively. The
per-head values spread widely (from -23.1 to -3.1; one head of the first layer has a far larger
log-sum-exp than the others), which one constant per layer cannot follow.

How the logits are gathered: a temporary attention implementation records, for every layer, a histogram
of the scaled logits of every allowed (query, key) pair (masks materialised by transformers' own mask
code) and then runs softmax SDPA, so each layer sees the original model's activations. A histogram keeps
the memory independent of the amount of text: 2^14 bins over [-128, 128] (1/64 wide) move each
``exp(s + b)`` term by at most 0.8%, and logits outside the range saturate the sigmoid anyway.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import random
import re
import shlex
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from .transformers import ATTN_IMPLEMENTATION, BIAS_FIELD, _checked_bias, register

GRANULARITIES = ("head", "layer", "model")
CALIBRATION_IMPLEMENTATION = "sigmoid_calibration"
_HIST_RANGE = 128.0
_HIST_BINS = 1 << 14
_BIAS_SEARCH = (-64.0, 32.0)
_BISECTION_STEPS = 60


# ------------------------------------------------------------------------------------- calibration


class _LogitHistograms:
    """Per layer: counts[head, bin] of allowed scaled logits and the number of queries with a key."""

    def __init__(self):
        self.counts: dict[int, Tensor] = {}
        self.queries: dict[int, float] = {}
        self.unnumbered = False  # an attention module without layer_idx was seen (counted as layer 0)

    def add(self, layer: int, query: Tensor, key: Tensor, allowed: Tensor, scaling: float) -> None:
        num_heads = query.shape[1]
        key = key.repeat_interleave(num_heads // key.shape[1], dim=1)  # [B, H, Sk, D]
        logits = (query.float() @ key.float().transpose(-1, -2)) * scaling  # [B, H, Sq, Sk]
        allowed = allowed.expand_as(logits) & _real_queries(allowed)[..., None]
        width = 2 * _HIST_RANGE / _HIST_BINS
        bins = ((logits + _HIST_RANGE) / width).floor().clamp(0, _HIST_BINS - 1).long()
        counts = torch.zeros(num_heads, _HIST_BINS, dtype=torch.float64, device=logits.device)
        counts.scatter_add_(
            1, bins.transpose(0, 1).reshape(num_heads, -1), allowed.transpose(0, 1).reshape(num_heads, -1).double()
        )
        queries = float(allowed[:, 0].any(dim=-1).sum())  # rows with at least one key
        if layer in self.counts:
            self.counts[layer] += counts.cpu()
            self.queries[layer] += queries
        else:
            self.counts[layer], self.queries[layer] = counts.cpu(), queries


def _real_queries(allowed: Tensor) -> Tensor:
    """(B or 1, H or 1, Sq): the queries of real tokens. In self-attention (Sq = Sk) a token always sees
    itself, so a query that may not attend its own key is padding (transformers' bidirectional masks let
    padding queries attend, and their outputs are discarded); otherwise, queries with any allowed key."""
    if allowed.shape[-2] == allowed.shape[-1]:
        return allowed.diagonal(dim1=-2, dim2=-1)
    return allowed.any(dim=-1)


def _capture_attention(histograms: _LogitHistograms):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            histograms.unnumbered, layer = True, 0
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        histograms.add(layer, query.detach(), key.detach(), _allowed_pairs(module, query, key, attention_mask), scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    return forward


def _allowed_pairs(module, query, key, mask) -> Tensor:
    """Boolean (B or 1, 1 or H, Sq, Sk) of the (query, key) pairs softmax attention attends."""
    if mask is not None:
        return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    if not getattr(module, "is_causal", False):
        return torch.ones(1, 1, seqlen_q, seqlen_k, dtype=torch.bool, device=query.device)
    i = torch.arange(seqlen_q, device=query.device)[:, None] + seqlen_k - seqlen_q
    return (torch.arange(seqlen_k, device=query.device)[None] <= i)[None, None]


def _materialised_mask(**kwargs):
    """transformers' SDPA mask, always materialised: the calibration needs the allowed pairs."""
    from transformers.masking_utils import sdpa_mask

    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(**kwargs)


def _solve_bias(counts: Tensor, queries: float) -> Tensor:
    """b per row of counts [N, bins] with mean mass sum(counts * sigmoid(centers + b)) / queries = 1."""
    width = 2 * _HIST_RANGE / _HIST_BINS
    centers = torch.arange(_HIST_BINS, dtype=torch.float64) * width - _HIST_RANGE + width / 2
    lo = torch.full((counts.shape[0],), _BIAS_SEARCH[0], dtype=torch.float64)
    hi = torch.full_like(lo, _BIAS_SEARCH[1])
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        mass = (counts * torch.sigmoid(centers[None] + mid[:, None])).sum(-1) / queries
        lo, hi = torch.where(mass > 1, lo, mid), torch.where(mass > 1, mid, hi)
    return (lo + hi) / 2


@torch.no_grad()
def calibrate_bias(model, batches: Iterable[dict], granularity: str = "head") -> float | list:
    """The bias that makes each query's sigmoid attention mass 1 on average over ``batches``.

    Args:
        model: a transformers model, run as it is (its current, softmax attention implementation is
            replaced by a recording one for the duration and then restored).
        batches: dicts of model inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...).
        granularity: ``"head"`` (a list per layer of per-head floats), ``"layer"`` (a float per layer) or
            ``"model"`` (one float); per-layer values need attention modules with a ``layer_idx``.

    Returns:
        the value to store in ``config.sigmoid_attn_bias``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    from transformers import AttentionInterface, AttentionMaskInterface

    histograms = _LogitHistograms()
    AttentionInterface.register(CALIBRATION_IMPLEMENTATION, _capture_attention(histograms))
    AttentionMaskInterface.register(CALIBRATION_IMPLEMENTATION, _materialised_mask)
    original = model.config._attn_implementation
    was_training = model.training
    model.eval()
    model.set_attn_implementation(CALIBRATION_IMPLEMENTATION)
    try:
        seen = 0
        for batch in batches:
            model(**{name: _to(x, model.device) for name, x in batch.items()})
            seen += 1
    finally:
        model.set_attn_implementation(original)
        model.train(was_training)
    if not seen or not histograms.counts:
        raise ValueError("calibrate_bias needs at least one batch that runs the model's attention")
    layers = sorted(histograms.counts)
    if granularity != "model" and (histograms.unnumbered or layers != list(range(len(layers)))):
        raise ValueError(
            f"per-{granularity} biases need attention modules numbered by layer_idx 0..L-1 "
            f"({'some have none' if histograms.unnumbered else f'got {layers}'}): use granularity='model'"
        )
    if granularity == "model":
        counts = sum(histograms.counts[layer].sum(0, keepdim=True) for layer in layers)
        queries = sum(histograms.queries[layer] * histograms.counts[layer].shape[0] for layer in layers)
        return round(float(_solve_bias(counts, queries)[0]), 4)
    result = []
    for layer in layers:
        counts, queries = histograms.counts[layer], histograms.queries[layer]
        if granularity == "layer":
            result.append(round(float(_solve_bias(counts.sum(0, keepdim=True), queries * counts.shape[0])[0]), 4))
        else:
            result.append([round(float(b), 4) for b in _solve_bias(counts, queries)])
    return result


def _to(x, device):
    return x.to(device) if isinstance(x, Tensor) else x


def convert_to_sigmoid(
    model,
    calibration_batches: Iterable[dict] | None = None,
    *,
    bias: float | list | None = None,
    granularity: str = "head",
) -> dict:
    """Switch ``model`` (a transformers model, in place) to sigmoid attention.

    The bias is ``bias`` when given, else calibrated on ``calibration_batches`` (``calibrate_bias``). It is
    stored in ``config.sigmoid_attn_bias``, so ``save_pretrained`` keeps it (attention dropout stays as
    configured: sigmoid attention applies it in training); ``attn_implementation`` becomes
    ``"sigmoid"``, and is written into the config (``config.attn_implementation``), so that
    ``save_pretrained`` records it in config.json: ``from_pretrained`` then builds the model with sigmoid
    attention after ``register()``, and without it refuses to (transformers raises that
    ``attn_implementation="sigmoid"`` is not supported) instead of loading it as softmax, its default.
    Returns a summary: the bias and the previous implementation."""
    if bias is not None:  # checked before the model changes: a NaN bias would surface only at its first forward
        bias = _checked_bias(bias)
    register()
    if bias is None:
        if calibration_batches is None:
            raise ValueError("convert_to_sigmoid needs calibration_batches to calibrate the bias, or an explicit bias")
        bias = calibrate_bias(model, calibration_batches, granularity)
    previous = model.config._attn_implementation
    configs = [model.config, *(getattr(model.config, n) for n in model.config.sub_configs if hasattr(model.config, n))]
    for config in configs:
        setattr(config, BIAS_FIELD, bias)
        # transformers does not save the implementation in use (config._attn_implementation), but a saved
        # "attn_implementation" is what from_pretrained reads back as the one to build.
        config.attn_implementation = ATTN_IMPLEMENTATION
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return {"bias": bias, "previous_attn_implementation": previous}


def bias_summary(bias: float | list) -> dict:
    """Min, mean and max of a bias value as stored in the config, and its granularity."""
    if isinstance(bias, float | int):
        return {"granularity": "model", "min": bias, "mean": bias, "max": bias}
    flat = [x for entry in bias for x in (entry if isinstance(entry, list | tuple) else [entry])]
    granularity = "head" if isinstance(bias[0], list | tuple) else "layer"
    return {"granularity": granularity, "min": min(flat), "mean": sum(flat) / len(flat), "max": max(flat)}


# -------------------------------------------------------------------------------------- text


# Standard-library modules whose docstrings give English text without downloading anything.
_DOC_MODULE_NAMES = """
    argparse ast asyncio base64 bisect calendar cmd codecs collections concurrent.futures configparser
    contextlib copy csv dataclasses datetime decimal difflib doctest email enum filecmp fileinput fnmatch
    fractions ftplib functools gettext glob graphlib gzip hashlib heapq hmac html.parser http.client imaplib
    importlib inspect io ipaddress itertools json locale logging lzma mailbox mimetypes multiprocessing netrc
    numbers operator optparse os pathlib pdb pickle pickletools pkgutil platform plistlib poplib pprint pydoc
    queue random re reprlib runpy sched secrets selectors shelve shlex shutil signal smtplib socket sqlite3 ssl
    statistics string struct subprocess symtable sysconfig tarfile tempfile textwrap threading timeit tokenize
    traceback types unittest urllib.request uuid warnings wave weakref xml.etree.ElementTree zipfile zipimport
"""
_DOC_MODULES = tuple(_DOC_MODULE_NAMES.split())
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CODE_LIKE = re.compile(r"[<>{}\[\]=_`|\\]")


def docstring_sentences(min_chars: int = 30, max_chars: int = 250) -> list[str]:
    """English sentences from the docstrings of the Python standard library, sorted and de-duplicated:
    calibration and distillation text that ships with every Python (about 3,000 sentences on 3.11)."""
    sentences = set()
    for name in _DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [module.__doc__]
        for _, obj in inspect.getmembers(module):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == name:
                docs.append(obj.__doc__)
        for doc in docs:
            if not isinstance(doc, str):
                continue
            for sentence in _SENTENCE_END.split(" ".join(doc.split())):
                if min_chars <= len(sentence) <= max_chars and sentence.isascii() and not _CODE_LIKE.search(sentence):
                    sentences.add(sentence)
    return sorted(sentences)


def text_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    """Padded, truncated batches of tokenised ``texts`` (model inputs as dicts of tensors)."""
    options = {"padding": True, "truncation": True, "max_length": max_length, "return_tensors": "pt"}
    return [dict(tokenizer(texts[i : i + batch_size], **options)) for i in range(0, len(texts), batch_size)]


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a local transformers model directory (nothing is downloaded)")
    parser.add_argument("output", help="directory to save the converted model (and tokenizer) to")
    parser.add_argument(
        "--granularity", choices=GRANULARITIES, default="head", help="one bias per head (default), layer or model"
    )
    parser.add_argument("--bias", type=_finite_float, help="use this bias instead of calibrating one")
    parser.add_argument("--text", help="calibration text, one sample per line (default: Python docstring sentences)")
    parser.add_argument("--samples", type=_positive_int, default=256, help="calibration samples to use (default 256)")
    parser.add_argument("--max-length", type=_positive_int, default=128, help="tokens per sample (default 128)")
    parser.add_argument("--batch-size", type=_positive_int, default=32)


def _positive_int(text: str) -> int:
    """A count: texts[:-1] would silently drop a sample, and a batch or length of 0 fails deep in a library."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def read_model_config(path: str | Path) -> dict:
    """``path/config.json``, checked for what loading needs: a ``model_type`` transformers knows and, if it
    names ``architectures``, a first one that is a transformers model class. Each problem is a one-line
    ValueError naming the file (transformers' own errors span lines, and take a missing folder for a Hub
    model name)."""
    import transformers

    folder, version = Path(path), transformers.__version__
    file = folder / "config.json"
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such directory (convert reads a local model directory; nothing is downloaded)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{file}: no such file: {folder} is not a transformers model directory") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{file}: expected a JSON object, got text that is not JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got a JSON {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        given = repr(model_type) if "model_type" in config else "none"
        raise ValueError(
            f"{file}: expected a model_type that transformers {version} knows, got {given}; "
            "upgrade transformers or fix the file"
        )
    names = config.get("architectures") or []
    if names and not _is_model_class(getattr(transformers, str(names[0]), None)):
        raise ValueError(
            f"{file}: architecture {names[0]!r} is not a model class of transformers {version} (a model's own code "
            "is never run); upgrade transformers, or remove architectures to load the base model (AutoModel)"
        )
    return config


def _is_model_class(obj) -> bool:
    import transformers

    return isinstance(obj, type) and issubclass(obj, transformers.PreTrainedModel)


def load_pretrained(path: str | Path):
    """The model of a local directory (its ``architectures`` class, else AutoModel) and its tokenizer, or
    None when it has none. Never downloads; a bad config.json is a ValueError naming it (``read_model_config``)."""
    import transformers

    names = read_model_config(path).get("architectures") or []
    model_class = getattr(transformers, names[0]) if names else transformers.AutoModel
    model = model_class.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


# The errors `sigattn convert` reports as a one-line message: a bad path or setting, transformers missing.
USER_ERRORS = (ValueError, OSError, ImportError)


def run(args) -> int:
    """``sigattn convert``: load, calibrate, convert, save; prints the bias summary."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError("sigattn convert needs transformers: pip install 'sigattn[hf]'") from None
    output = Path(args.output)
    if output.exists() and not output.is_dir():  # save_pretrained would only log this, and write nothing
        raise ValueError(f"{output} is a file, not a folder: choose another output folder (or move the file)")
    if output.resolve() == Path(args.model).resolve():  # save_pretrained would overwrite the model's files
        raise ValueError(
            f"output {output} is the model folder {args.model}: the converted model would overwrite it; choose "
            "another output folder"
        )
    if not output.exists() and not output.parent.exists():  # save_pretrained would create it: a mistyped path
        raise ValueError(
            f"output {output}: the folder {output.parent} does not exist: create it first (mkdir -p "
            f"{shlex.quote(str(output.parent))}) or choose another output folder"
        )
    model, tokenizer = load_pretrained(args.model)
    batches = None
    if args.bias is None:
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer to calibrate with: pass --bias")
        texts = _calibration_texts(args.text, args.samples)
        batches = text_batches(tokenizer, texts, args.batch_size, args.max_length)
    report = convert_to_sigmoid(model, batches, bias=args.bias, granularity=args.granularity)
    model.save_pretrained(args.output)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output)
    summary = bias_summary(report["bias"])
    print(
        f"converted {args.model} -> {args.output}: attn_implementation='sigmoid', {BIAS_FIELD} per "
        f"{summary['granularity']} in [{summary['min']:.2f}, {summary['max']:.2f}] (mean {summary['mean']:.2f})"
    )
    print(
        f"load it with sigattn.integrations.transformers.register(), then from_pretrained({str(args.output)!r}) "
        f"(its config.json names attn_implementation='sigmoid': without register(), transformers refuses it)"
    )
    return 0


def _calibration_texts(path: str | None, samples: int) -> list[str]:
    if path is None:
        texts = docstring_sentences()
        random.Random(0).shuffle(texts)
    else:
        texts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"no calibration text in {path}")
    return texts[:samples]


__all__ = [
    "GRANULARITIES",
    "bias_summary",
    "calibrate_bias",
    "convert_to_sigmoid",
    "docstring_sentences",
    "load_pretrained",
    "read_model_config",
    "text_batches",
]
