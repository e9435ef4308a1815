"""sigattn: sigmoid self-attention for PyTorch.

``out = sigmoid(scale * q k^T + bias) v`` with ``bias = -log(seqlen_k)`` by default, behind flash-attn's
and SDPA's calling conventions. See ``sigattn.ops.sigmoid_attn.reference`` for the exact semantics.
"""

from .backends import BackendNotSupportedError, use_backend
from .functional import (
    scaled_dot_product_sigmoid_attention,
    sigmoid_attn_func,
    sigmoid_attn_varlen_func,
    sigmoid_attn_with_kvcache,
)

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupportedError",
    "__version__",
    "scaled_dot_product_sigmoid_attention",
    "sigmoid_attn_func",
    "sigmoid_attn_varlen_func",
    "sigmoid_attn_with_kvcache",
    "use_backend",
]
