"""sigattn: sigmoid self-attention for PyTorch.

``out = sigmoid(scale * q k^T + bias) v`` with ``bias = -log(seqlen_k)`` by default, behind flash-attn's
and SDPA's calling conventions. See ``sigattn.ops.sigmoid_attn.reference`` for the exact semantics.

The public names are imported on first use (PEP 562): ``import sigattn`` alone does not import torch, so
``sigattn --version`` and ``--help`` answer at once; ``sigattn.sigmoid_attn_func`` (or ``from sigattn
import ...``) imports torch and the functions.
"""

import importlib as _importlib
import importlib.metadata as _metadata
import importlib.util as _util
import typing as _typing

try:
    # The one place the version is written is pyproject.toml; installing the package records it.
    __version__ = _metadata.version("sigattn")
except _metadata.PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

if _typing.TYPE_CHECKING:
    from .backends import BackendNotSupportedError, use_backend
    from .functional import (
        scaled_dot_product_sigmoid_attention,
        sigmoid_attn_func,
        sigmoid_attn_varlen_func,
        sigmoid_attn_with_kvcache,
    )

# Public name -> the module that defines it.
_PUBLIC = {
    "BackendNotSupportedError": ".backends",
    "use_backend": ".backends",
    "scaled_dot_product_sigmoid_attention": ".functional",
    "sigmoid_attn_func": ".functional",
    "sigmoid_attn_varlen_func": ".functional",
    "sigmoid_attn_with_kvcache": ".functional",
}

__all__ = [
    "BackendNotSupportedError",
    "__version__",
    "scaled_dot_product_sigmoid_attention",
    "sigmoid_attn_func",
    "sigmoid_attn_varlen_func",
    "sigmoid_attn_with_kvcache",
    "use_backend",
]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(_importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value  # looked up once
        return value
    # A submodule (``sigattn.backends`` after ``import sigattn``), as when the package imported them eagerly.
    if not name.startswith("_") and _util.find_spec(f"{__name__}.{name}") is not None:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
