"""``sigattn bench``: speed and memory of sigmoid attention against softmax-attention baselines, on CUDA.

The sweep is flash-attn's benchmark setup: batch * seqlen = 16384 tokens, hidden 2048 = heads * headdim,
headdim 64 and 128, seqlen 512 to 16k, causal and full, bf16. Every (provider, shape, mode) is timed with
``triton.testing.do_bench`` (median); inputs are random normal, drawn afresh for every shape and provider,
and require grad (so ``fwd`` is a training forward). Providers (``PROVIDERS``):

    sigattn       sigmoid_attn_func on the "triton" backend; skipped, with the reason, while no such
                  backend is registered
    sdpa-flash    softmax torch.nn.functional.scaled_dot_product_attention, FlashAttention kernel
    sdpa-cudnn    the same on cuDNN's kernel
    flex-sigmoid  exact sigmoid attention in FlexAttention, compiled (``flex_sigmoid_attention``)
    flex-softmax  softmax FlexAttention with the shape's mask as a block mask (``flex_softmax_attention``):
                  the softmax baseline of sliding windows
    triton-sigmoid  the PyPI package triton-sigmoid (0.1.2: dense, one key head per query head, full or
                  causal), with sigattn's bias -log(seqlen); skipped while it is not installed

``--matrix`` measures the configuration matrix (``matrix_shapes``: sliding windows, ALiBi, a per-head bias,
a deterministic backward, dropout, every head dim, Dqk/Dv 192/128, GQA 32/8) instead. A provider that does
not compute what sigattn computes for a shape says why (``Provider.declines``), and the table shows a skip
with that reason: SDPA has no sliding window, no softmax kernel computes ALiBi or a per-head bias as sigmoid
attention does (a per-head constant cancels in the softmax).

FLOPs count only the unmasked (query, key) pairs (``unmasked_pairs``: S * S full, S * (S + 1) / 2 causal, a
window's band): forward ``2 * B * H * pairs * (D + Dv)``; backward 2.5 x forward; forward + backward 3.5 x.

``peak_mem_mb``, in MiB (2**20 bytes): the peak of ``torch.cuda.max_memory_allocated`` during one call of
the timed function, less what was allocated before the call (the inputs, and for ``bwd`` the forward's
graph). It is measured in its own call, outside ``do_bench``, whose cache-flushing buffer would count.

``--memory`` runs the memory check instead of the sweep: B=1, H=16, D=128, seqlen 65536, causal and full,
forward + backward. Its rows have mode ``"fwd+bwd-memory"``, and there ``peak_mem_mb`` also leaves out
the output and the three gradients: what remains is the attention's own working memory.

``--json PATH`` writes ``{"meta": {"device", "torch", "triton", "python", "cuda", "date", "command",
"git_commit"}, "rows": [{"provider", "mode", "batch", "heads", "seqlen", "headdim", "causal", "dtype", "window",
"alibi", "head_bias", "deterministic", "dropout", "headdim_v", "kv_heads", "ms", "tflops", "peak_mem_mb"}]}``
(``meta`` is ``sigattn.runinfo.run_meta``: ``git_commit`` None outside a git checkout, "-dirty" when tracked
files changed). A measurement that failed (out of memory, unsupported shape) or that a provider declines is no
row; the printed table marks it "skip" with the error or the reason. ``--plot PATH`` draws TFLOP/s against
seqlen, one panel per (headdim, mask, mode) (``plot``), or for the matrix bars per configuration and
provider, one panel per mode (``plot_matrix``); ``--replot JSON`` draws a saved run (``replot``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import math
import shlex
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from .. import sigmoid_attn_func, use_backend
from ..backends import BACKENDS
from ..ops.sigmoid_attn.reference import Mask, in_window
from ..plotting import figure, save_figure
from ..runinfo import run_meta, write_json

TOKENS, HIDDEN = 16384, 2048
HEADDIMS = (64, 128)
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_HEADDIMS, QUICK_SEQLENS = (128,), (1024, 4096)
# The configuration matrix (--matrix): its sequence lengths, windows (keys back from the diagonal) and head dims.
MATRIX_SEQLENS, QUICK_MATRIX_SEQLENS = (1024, 4096, 16384), (4096,)
MATRIX_WINDOWS = (256, 1024, 4096)
MATRIX_HEADDIMS = (32, 64, 96, 128, 192, 256)
MODES = ("fwd", "bwd", "fwd+bwd")
MEMORY_MODE = "fwd+bwd-memory"
FLOPS_PER_FORWARD = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5, MEMORY_MODE: 3.5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# do_bench (warmup, rep) in ms. The warmup is 10x triton's default: a provider measured right after another
# one compiled (FlexAttention: seconds of an idle GPU) otherwise ran its first mode at idle clocks (an H100
# forward at 260 instead of 540 TFLOP/s). Shorter for --quick.
TIMING, QUICK_TIMING = (250, 100), (50, 40)

Attn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class Shape:
    """One measured configuration. The fields after ``dtype`` are the configuration matrix's (``--matrix``);
    their defaults are the sweep's plain full or causal attention."""

    batch: int
    heads: int
    seqlen: int
    headdim: int
    causal: bool
    dtype: str  # a key of DTYPES
    window: tuple[int, int] | None = None  # flash-attn's window_size (left, right); None: no window
    alibi: bool = False  # ALiBi slopes, one per head
    head_bias: bool = False  # a per-head bias tensor, which receives a gradient
    deterministic: bool = False  # a deterministic backward
    dropout: float = 0.0  # attention dropout probability
    headdim_v: int | None = None  # the value head dim; None: headdim
    kv_heads: int | None = None  # key/value heads (GQA); None: heads

    @property
    def dv(self) -> int:
        return self.headdim if self.headdim_v is None else self.headdim_v

    @property
    def hkv(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def config(self) -> str:
        """The matrix options of this shape in a few words ("" for the sweep's plain shapes)."""
        words = [f"window {self.window[0]},{self.window[1]}"] if self.window else []
        words += [name for name in ("alibi", "head_bias", "deterministic") if getattr(self, name)]
        words += [f"dropout {self.dropout:g}"] if self.dropout else []
        words += [f"dv {self.dv}"] if self.dv != self.headdim else []
        words += [f"gqa {self.heads}/{self.hkv}"] if self.hkv != self.heads else []
        return " ".join(words)


def sweep_shapes(headdims: Iterable[int], seqlens: Iterable[int], causals: Iterable[bool], dtype: str) -> list[Shape]:
    """flash-attn's setup: TOKENS tokens per batch and HIDDEN = heads * headdim."""
    return [Shape(max(TOKENS // s, 1), HIDDEN // d, s, d, c, dtype) for d in headdims for c in causals for s in seqlens]


def matrix_shapes(seqlens: Iterable[int], dtype: str) -> list[Shape]:
    """The configuration matrix (issue 26) at TOKENS tokens: causal sliding windows of MATRIX_WINDOWS keys
    back (shorter than the sequence), ALiBi, a per-head bias, a deterministic backward and dropout 0.1 at
    D128 causal; every head dim of MATRIX_HEADDIMS causal and full (heads = HIDDEN // headdim); query/key
    head dim 192 with value head dim 128; GQA of 32 query heads over 8 at D64, causal and full."""

    def at(seqlen: int, headdim: int = 128, causal: bool = True, **options) -> Shape:
        return Shape(max(TOKENS // seqlen, 1), HIDDEN // headdim, seqlen, headdim, causal, dtype, **options)

    shapes = []
    for s in seqlens:
        shapes += [at(s, window=(w, 0)) for w in MATRIX_WINDOWS if w < s]
        shapes += [at(s, alibi=True), at(s, head_bias=True), at(s, deterministic=True), at(s, dropout=0.1)]
        shapes += [at(s, d, c) for d in MATRIX_HEADDIMS for c in (True, False)]
        shapes += [at(s, 192, headdim_v=128), *(at(s, 64, c, kv_heads=8) for c in (True, False))]
    return shapes


def memory_shapes(causals: Iterable[bool], dtype: str) -> list[Shape]:
    return [Shape(1, 16, 65536, 128, c, dtype) for c in causals]


def unmasked_pairs(seqlen: int, causal: bool, window: tuple[int, int] | None) -> int:
    """The (query, key) pairs a mask allows in a square score matrix: query i sees keys i - left .. i + right
    (a bound of -1 unbounded; causal sets right = 0), clipped to [0, seqlen)."""
    left, right = window or (-1, -1)
    right = 0 if causal else right
    i = torch.arange(seqlen, dtype=torch.int64)
    first = (i - left).clamp(min=0) if left >= 0 else torch.zeros_like(i)
    last = (i + right).clamp(max=seqlen - 1) if right >= 0 else torch.full_like(i, seqlen - 1)
    return int((last - first + 1).clamp(min=0).sum())


def attention_flops(shape: Shape, mode: str) -> float:
    """The products' FLOPs over the unmasked pairs: 2 per multiply-add of Q Kᵀ (headdim) and of P V (the
    value head dim) in the forward; the backward 2.5 times the forward (flash-attn's convention)."""
    pairs = unmasked_pairs(shape.seqlen, shape.causal, shape.window)
    return 2 * shape.batch * shape.heads * pairs * (shape.headdim + shape.dv) * FLOPS_PER_FORWARD[mode]


# ----------------------------------------------------------------------------------------- providers


def _serves_every_shape(shape: Shape) -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    layout: str  # "bshd" (flash-attn's (B, S, H, D)) or "bhsd" (SDPA's (B, H, S, D))
    build: Callable[[Shape], Attn]  # the attention for one shape; masks and compilation happen here, untimed
    missing: Callable[[], str | None]  # why the provider cannot run in this installation, else None
    # why it does not compute what sigattn computes for this shape (a skip with that reason), else None
    declines: Callable[[Shape], str | None] = _serves_every_shape


def alibi_slopes(heads: int, device="cuda") -> Tensor:
    """The ALiBi paper's slopes for ``heads`` heads (a power of two: 2^(-8 h / heads)), float32."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], device=device)


def _sigattn(shape: Shape, device="cuda") -> Attn:
    slopes = alibi_slopes(shape.heads, device) if shape.alibi else None
    bias = None
    if shape.head_bias:
        bias = torch.full((shape.heads,), -math.log(shape.seqlen), device=device, requires_grad=True)
    options = dict(causal=shape.causal, window_size=shape.window or (-1, -1), alibi_slopes=slopes, bias=bias)

    def attn(q, k, v):
        with use_backend("triton"):
            return sigmoid_attn_func(q, k, v, shape.dropout, deterministic=shape.deterministic, **options)

    return attn


def _sigattn_missing() -> str | None:
    if "triton" not in BACKENDS:
        return f"no 'triton' backend is registered (sigattn.backends.BACKENDS holds {', '.join(BACKENDS)})"
    return None


def _softmax_declines(shape: Shape) -> str | None:
    """What no softmax kernel computes as sigattn does: ALiBi and per-head biases change sigmoid attention but
    not softmax (a per-head constant cancels), and sigattn's own deterministic backward is the baseline of
    its non-deterministic one."""
    if shape.alibi or shape.head_bias:
        return "a bias term: softmax baselines time the same mask without it (ALiBi and head biases are sigattn's)"
    if shape.deterministic:
        return "deterministic: compared with sigattn's own backward"
    return None


def _sdpa(kernel: str) -> Callable[[Shape], Attn]:
    def build(shape: Shape) -> Attn:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, kernel)
        options = dict(is_causal=shape.causal, dropout_p=shape.dropout, enable_gqa=shape.hkv != shape.heads)

        def attn(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, **options)

        return attn

    return build


def _sdpa_missing(kernel: str) -> Callable[[], str | None]:
    def missing():
        from torch.nn.attention import SDPBackend

        return None if hasattr(SDPBackend, kernel) else f"torch {torch.__version__} has no SDPBackend.{kernel}"

    return missing


def _sdpa_declines(shape: Shape) -> str | None:
    if shape.window:
        return "SDPA has no sliding window (but through attn_mask, which its flash and cuDNN kernels do not take)"
    return _softmax_declines(shape)


def _flex_missing() -> str | None:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no FlexAttention (torch >= 2.5)"
    return None


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_sigmoid_attention(seqlen: int, causal: bool, device, *, compiled: bool = True) -> Attn:
    """Exact sigmoid attention (bias -log(seqlen), scale 1/sqrt(D)) of (B, H, S, D) inputs in FlexAttention.

    FlexAttention takes the softmax of ``score_mod(s)`` and returns ``lse = log sum_j exp(score_mod(s_j))``.
    With ``score_mod(s) = logsigmoid(s + b)`` the softmax weights are ``sigmoid(s_j + b) / Z`` with
    ``Z = sum_j sigmoid(s_j + b) = exp(lse)``, so ``out * exp(lse) = sum_j sigmoid(s_j + b) v_j``, masked keys
    contributing 0. ``compiled=False`` runs FlexAttention eagerly (it materialises the scores; CPU tests).
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    bias = -math.log(seqlen)

    # logsigmoid (log1p inside) dominates at headdim 64: the forward ran at 64 TFLOP/s against 404 for
    # FlexAttention with no score_mod (H100, torch 2.11, B=4, H=32, S=4096, full); 183 vs 461 at 128.
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.nn.functional.logsigmoid(score + bias)

    block_mask = create_block_mask(_causal, None, None, seqlen, seqlen, device=device) if causal else None

    def attn(q, k, v):
        out, lse = _flex_attention_with_lse(flex_attention, q, k, v, score_mod, block_mask)
        return (out * lse.exp().unsqueeze(-1)).to(out.dtype)  # [B, H, S, D] * [B, H, S, 1], in float32

    if not compiled:
        return attn
    # A fresh compilation per shape: past dynamo's recompile limit a shape would silently run eagerly.
    torch._dynamo.reset()
    return torch.compile(attn, fullgraph=True)


def _flex_attention_with_lse(flex_attention, q, k, v, score_mod, block_mask) -> tuple[Tensor, Tensor]:
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9: return_lse, deprecated since
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=True)
    out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _plain_declines(what: str) -> Callable[[Shape], str | None]:
    """For a provider that computes plain (full or causal, one head per key head, D = Dv) attention only."""

    def declines(shape: Shape) -> str | None:
        return f"{what} computes full or causal attention only" if shape.config else None

    return declines


def window_mask(causal: bool, window: tuple[int, int] | None):
    """FlexAttention's ``mask_mod`` of sigattn's mask on a square score matrix (None: no mask at all): the
    reference's ``in_window``, query i at key position i."""
    mask = Mask(causal, window or (-1, -1))
    if mask.full:
        return None

    def mask_mod(b, h, q_idx, kv_idx):
        return in_window(kv_idx >= 0, kv_idx, q_idx, mask)

    return mask_mod


def flex_softmax_attention(shape: Shape, device="cuda", *, compiled: bool = True) -> Attn:
    """Softmax attention in FlexAttention with sigattn's mask as a block mask, so that masked tiles are
    skipped: the softmax baseline for sliding windows (SDPA's kernels have none)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask_mod = window_mask(shape.causal, shape.window)
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, None, None, shape.seqlen, shape.seqlen, device=device)
    gqa = shape.hkv != shape.heads

    def attn(q, k, v):
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    if not compiled:
        return attn
    torch._dynamo.reset()
    return torch.compile(attn, fullgraph=True)


def _flex_softmax_declines(shape: Shape) -> str | None:
    return _softmax_declines(shape) or ("dropout: FlexAttention has none" if shape.dropout else None)


def _triton_sigmoid(shape: Shape) -> Attn:
    import triton_sigmoid

    bias = -math.log(shape.seqlen)

    def attn(q, k, v):
        return triton_sigmoid.sigmoid_attention(q, k, v, is_causal=shape.causal, sigmoid_bias=bias)

    return attn


def _triton_sigmoid_missing() -> str | None:
    if importlib.util.find_spec("triton_sigmoid") is None:
        return "the package triton-sigmoid is not installed (pip install triton-sigmoid==0.1.2)"
    return None


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("sigattn", "bshd", _sigattn, _sigattn_missing),
        Provider("sdpa-flash", "bhsd", _sdpa("FLASH_ATTENTION"), _sdpa_missing("FLASH_ATTENTION"), _sdpa_declines),
        Provider("sdpa-cudnn", "bhsd", _sdpa("CUDNN_ATTENTION"), _sdpa_missing("CUDNN_ATTENTION"), _sdpa_declines),
        Provider(
            "flex-sigmoid",
            "bhsd",
            lambda s: flex_sigmoid_attention(s.seqlen, s.causal, "cuda"),
            _flex_missing,
            _plain_declines("this FlexAttention formulation"),
        ),
        Provider("flex-softmax", "bhsd", flex_softmax_attention, _flex_missing, _flex_softmax_declines),
        Provider("triton-sigmoid", "bshd", _triton_sigmoid, _triton_sigmoid_missing, _plain_declines("triton-sigmoid")),
    )
}
BASELINE = "sigattn"  # ratios are its TFLOP/s over each other provider's


# --------------------------------------------------------------------------------------- measurement


def make_inputs(layout: str, shape: Shape, device="cuda") -> list[Tensor]:
    """q (heads, headdim), k (kv heads, headdim) and v (kv heads, value head dim), in ``layout``."""
    b, s = shape.batch, shape.seqlen
    heads_dims = ((shape.heads, shape.headdim), (shape.hkv, shape.headdim), (shape.hkv, shape.dv))
    dims = [(b, s, h, d) if layout == "bshd" else (b, h, s, d) for h, d in heads_dims]
    return [torch.randn(d, device=device, dtype=DTYPES[shape.dtype], requires_grad=True) for d in dims]


def timed_call(attn: Attn, inputs: list[Tensor], mode: str) -> Callable[[], object]:
    """What one timing of ``mode`` runs: the forward, the backward of one saved forward, or both."""
    q, k, v = inputs
    dout = torch.randn(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype)  # the output's shape
    if mode == "fwd":
        return lambda: attn(q, k, v)
    if mode == "bwd":
        out = attn(q, k, v)
        return lambda: out.backward(dout, retain_graph=True)
    return lambda: attn(q, k, v).backward(dout)


def measure_cuda(attn: Attn, layout: str, shape: Shape, mode: str, timing=TIMING) -> tuple[float, float]:
    """(median ms, peak MiB beyond what was allocated before) of one mode of ``attn`` on fresh inputs."""
    from triton.testing import do_bench

    q, k, v = inputs = make_inputs(layout, shape)
    step = timed_call(attn, inputs, mode)
    warmup, rep = timing
    ms = do_bench(step, warmup=warmup, rep=rep, grad_to_none=inputs, return_mode="median")
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    if mode == MEMORY_MODE:
        peak -= 4 * q.numel() * q.element_size()  # the output and the three gradients
    return ms, peak / 2**20


@dataclasses.dataclass(frozen=True)
class Skip:
    provider: str
    shape: Shape
    mode: str
    error: str


def make_row(provider: str, shape: Shape, mode: str, ms: float, peak_mib: float) -> dict:
    return {
        "provider": provider,
        "mode": mode,
        **dataclasses.asdict(shape),
        "headdim_v": shape.dv,
        "kv_heads": shape.hkv,
        "ms": round(ms, 5),
        "tflops": round(attention_flops(shape, mode) / (ms * 1e-3) / 1e12, 2),
        "peak_mem_mb": round(peak_mib, 1),
    }


def describe_error(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 160 else text[:157] + "..."


def run_sweep(
    shapes: list[Shape],
    providers: list[Provider],
    modes: Iterable[str],
    measure: Callable[[Attn, str, Shape, str], tuple[float, float]],
    progress: Callable[[str], None] = lambda line: None,
) -> tuple[list[dict], list[Skip]]:
    """Measures every (shape, provider, mode); a failure becomes a Skip and the sweep goes on."""
    rows, skips = [], []
    for shape in shapes:
        before = len(rows)
        for provider in providers:
            declined = provider.declines(shape)
            if declined:
                skips += [Skip(provider.name, shape, mode, f"not measured: {declined}") for mode in modes]
                continue
            try:
                attn = provider.build(shape)
            except Exception as error:  # a provider that cannot even be set up
                skips += [Skip(provider.name, shape, mode, describe_error(error)) for mode in modes]
                continue
            for mode in modes:
                try:
                    ms, peak = measure(attn, provider.layout, shape, mode)
                except Exception as error:  # out of memory, an unsupported shape: record it, measure the rest
                    skips.append(Skip(provider.name, shape, mode, describe_error(error)))
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                rows.append(make_row(provider.name, shape, mode, ms, peak))
        what = " ".join(filter(None, [f"headdim {shape.headdim}", _mask(shape.causal), shape.config]))
        progress(f"{what} seqlen {shape.seqlen}: {len(rows) - before} measured")
    return rows, skips


# ------------------------------------------------------------------------------------------- reports


def _mask(causal: bool) -> str:
    return "causal" if causal else "full"


def _seqlen_label(s: int) -> str:
    return f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s)


def row_shape(row: dict) -> Shape:
    """The Shape a row (``make_row``'s, or read back from JSON) was measured at."""
    fields = {f.name: row[f.name] for f in dataclasses.fields(Shape) if f.name in row}
    if fields.get("window") is not None:
        fields["window"] = tuple(fields["window"])
    return Shape(**fields)


def format_table(rows: list[dict], skips: list[Skip], providers: list[str], metric="tflops", ratios=True) -> str:
    """One line per (headdim, mask, configuration, seqlen, mode): ``metric`` per provider, then sigattn's
    TFLOP/s over each other provider's (>1: sigattn is faster). A measurement that failed or that a provider
    declines shows "skip[n]", n its footnote. The configuration column appears when some shape has one."""
    cells: dict[tuple, dict[str, str]] = {}  # (headdim, causal, config, seqlen, mode) -> provider -> cell
    values: dict[tuple, dict[str, float]] = {}
    notes: dict[str, int] = {}  # error -> footnote number
    for r in rows:
        key = (r["headdim"], r["causal"], row_shape(r).config, r["seqlen"], r["mode"])
        cells.setdefault(key, {})[r["provider"]] = f"{r[metric]:.1f}"
        values.setdefault(key, {})[r["provider"]] = r[metric]
    for s in skips:
        note = notes.setdefault(s.error, len(notes) + 1)
        key = (s.shape.headdim, s.shape.causal, s.shape.config, s.shape.seqlen, s.mode)
        cells.setdefault(key, {})[s.provider] = f"skip[{note}]"
    others = [p for p in providers if p != BASELINE] if ratios and BASELINE in providers else []
    configs = any(key[2] for key in cells)
    lines = [["headdim", "mask", *(["config"] if configs else []), "seqlen", "mode", *providers]]
    lines[0] += [f"vs {p}" for p in others]
    for key, by_provider in cells.items():
        ours = values.get(key, {}).get(BASELINE)
        theirs = [values.get(key, {}).get(p) for p in others]
        lines.append(
            [
                str(key[0]),
                _mask(key[1]),
                *([key[2] or "-"] if configs else []),
                str(key[3]),
                key[4],
                *(by_provider.get(p, "-") for p in providers),
                *(f"{ours / t:.2f}x" if ours and t else "-" for t in theirs),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(text + [f"[{n}] {error}" for error, n in notes.items()])


def plot(rows: list[dict], path: Path, title: str = ""):
    """TFLOP/s against seqlen: a column per (headdim, mask), a row per mode, a line per provider."""
    rows = [r for r in rows if r["mode"] in MODES]
    columns = sorted({(r["headdim"], r["causal"]) for r in rows}, key=lambda c: (c[0], not c[1]))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    fig = figure(figsize=(4.2 * len(columns), 3.2 * len(modes)), layout="constrained", extra="bench")
    axes = fig.subplots(len(modes), len(columns), squeeze=False)
    for (i, mode), (j, (headdim, causal)) in itertools.product(enumerate(modes), enumerate(columns)):
        ax = axes[i][j]
        for p in providers:
            points = sorted(
                (r["seqlen"], r["tflops"])
                for r in rows
                if (r["provider"], r["mode"], r["headdim"], r["causal"]) == (p, mode, headdim, causal)
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=p, color=f"C{list(PROVIDERS).index(p)}")
        seqlens = sorted({r["seqlen"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqlens, [_seqlen_label(s) for s in seqlens])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title(f"headdim {headdim}, {_mask(causal)}, {mode}", fontsize=10)
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOP/s")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(providers))
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    return fig


def plot_matrix(rows: list[dict], path: Path, title: str = ""):
    """The configuration matrix as bars: a panel per mode, a group per (head dim, mask, configuration,
    seqlen) in the order measured, a bar per provider that measured it (TFLOP/s over the unmasked area)."""
    rows = [r for r in rows if r["mode"] in MODES]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    groups = list(
        dict.fromkeys((r["headdim"], r["causal"], row_shape(r).config, r["seqlen"]) for r in rows)
    )  # fmt: skip
    values = {(r["mode"], r["headdim"], r["causal"], row_shape(r).config, r["seqlen"], r["provider"]): r["tflops"]
              for r in rows}  # fmt: skip
    height = 0.8 / len(providers)
    fig = figure(
        figsize=(5.0 * len(modes), 1.0 + 0.22 * len(groups) * len(providers)), layout="constrained", extra="bench"
    )
    axes = fig.subplots(1, len(modes), squeeze=False, sharey=True)[0]
    for ax, mode in zip(axes, modes, strict=True):
        for k, provider in enumerate(providers):
            points = [
                (g, values[(mode, *group, provider)])
                for g, group in enumerate(groups)
                if (mode, *group, provider) in values
            ]
            if points:
                where, tflops = zip(*points, strict=True)
                offsets = [g + (k - (len(providers) - 1) / 2) * height for g in where]
                color = f"C{list(PROVIDERS).index(provider)}"
                ax.barh(offsets, tflops, height=height, label=provider, color=color)
        ax.set_yticks(
            range(len(groups)),
            [f"D{d} {_mask(c)} {config or 'plain'} {_seqlen_label(n)}" for d, c, config, n in groups],
            fontsize=8,
        )
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("TFLOP/s")
        ax.set_title(mode, fontsize=10)
    axes[0].invert_yaxis()  # (the panels share it) the first measured at the top
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(providers))
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    return fig


def replot(json_path: Path, path: Path) -> Path:
    """Draws ``path`` from a saved run (``--json``'s file): the matrix's bars when its rows have
    configurations, else the sweep's lines; titled with the run's device, versions and date."""
    saved = json.loads(Path(json_path).read_text())
    meta, rows = saved["meta"], [r for r in saved["rows"] if r.get("tflops") is not None]
    if not rows:
        raise ValueError(f"{json_path} holds no measured rows to plot")
    title = f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}"
    draw = plot_matrix if any(row_shape(r).config for r in rows) else plot
    draw(rows, path, title)
    return path


# ------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one ``sigattn bench`` sweep measures (``sigattn.bench.command.make_plan`` builds it)."""

    shapes: list[Shape]
    modes: list[str]
    providers: list[str]
    timing: tuple[int, int]


def run(plan: Plan, args: argparse.Namespace, argv: list[str]) -> int:
    """The sweep (or with ``args.memory``, the memory check) of ``plan`` on CUDA: prints the table and
    writes ``args.json`` and ``args.plot`` if given. ``argv`` is the command line after ``sigattn``."""
    providers = []
    for name in plan.providers:
        reason = PROVIDERS[name].missing()
        if reason:
            print(f"skipping provider {name}: {reason}")
        else:
            providers.append(PROVIDERS[name])
    meta = run_meta(shlex.join(["sigattn", *argv]))
    title = f"{meta['device']}, {args.dtype}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}"
    if args.memory:
        print(f"{title}\nPeak MiB of forward + backward beyond inputs, output and gradients; B=1, H=16, D=128")
    else:
        print(
            f"{title}\nTFLOP/s (median of triton.testing.do_bench), {TOKENS} tokens, hidden {HIDDEN}; "
            f"'vs P' = sigattn TFLOP/s / P's"
        )
    measure = lambda attn, layout, shape, mode: measure_cuda(attn, layout, shape, mode, plan.timing)
    progress = lambda line: print(line, file=sys.stderr, flush=True)
    rows, skips = run_sweep(plan.shapes, providers, plan.modes, measure, progress)
    names = [p.name for p in providers]
    print(
        format_table(rows, skips, names, metric="peak_mem_mb", ratios=False)
        if args.memory
        else format_table(rows, skips, names)
    )
    if args.json:
        write_json(args.json, meta, rows)
        print(f"wrote {args.json}")
    if args.plot:
        (plot_matrix if args.matrix else plot)(rows, args.plot, title)
        print(f"wrote {args.plot}")
    return 0
