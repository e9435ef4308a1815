"""The public API, pinned: ``sigattn.__all__`` and documented, annotated public functions."""

from __future__ import annotations

import inspect

import pytest

import sigattn

PUBLIC_API = [
    "BackendNotSupportedError",
    "__version__",
    "scaled_dot_product_sigmoid_attention",
    "sigmoid_attn_func",
    "sigmoid_attn_varlen_func",
    "sigmoid_attn_with_kvcache",
    "use_backend",
]
FUNCTIONS = [name for name in PUBLIC_API if inspect.isfunction(getattr(sigattn, name, None))]


def test_all_is_pinned():
    assert sigattn.__all__ == PUBLIC_API
    for name in PUBLIC_API:
        assert hasattr(sigattn, name), name


def test_version_is_a_string():
    assert isinstance(sigattn.__version__, str) and sigattn.__version__.count(".") == 2


def test_functions_found():
    assert FUNCTIONS == [
        "scaled_dot_product_sigmoid_attention",
        "sigmoid_attn_func",
        "sigmoid_attn_varlen_func",
        "sigmoid_attn_with_kvcache",
        "use_backend",
    ]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_public_function_has_docstring_and_annotations(name):
    fn = getattr(sigattn, name)
    doc = inspect.getdoc(fn)
    assert doc and len(doc.splitlines()) >= 2, f"{name} needs a docstring"
    signature = inspect.signature(fn)
    missing = [p for p, param in signature.parameters.items() if param.annotation is inspect.Parameter.empty]
    assert not missing, f"{name}: parameters without a type annotation: {missing}"
    assert signature.return_annotation is not inspect.Signature.empty, f"{name}: no return annotation"


@pytest.mark.parametrize("name", [f for f in FUNCTIONS if f != "use_backend"])
def test_attention_docstrings_document_every_argument(name):
    """Each argument is described in the function's docstring, or (varlen, kvcache) the docstring defers
    "other options" to sigmoid_attn_func, whose docstring describes them."""
    fn = getattr(sigattn, name)
    doc = inspect.getdoc(fn)
    assert "Returns:" in doc
    # Documented: an Args entry, or named in code markup (SDPA's ``enable_gqa=True`` in key's entry).
    missing = [p for p in inspect.signature(fn).parameters if p not in documented_args(doc) and f"``{p}" not in doc]
    if missing:
        assert "Other options as in ``sigmoid_attn_func``" in doc, f"{name}: undocumented {missing}"
        base = documented_args(inspect.getdoc(sigattn.sigmoid_attn_func))
        assert set(missing) <= base, f"{name}: undocumented {sorted(set(missing) - base)}"


def documented_args(doc: str) -> set[str]:
    """Names described in the Args section: lines ``name: ...`` or ``name1, name2: ...``."""
    args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    names = set()
    for line in args.splitlines():
        head = line.strip().split(":", 1)[0]
        if ":" in line and all(part.isidentifier() for part in head.split(", ")):
            names.update(head.split(", "))
    return names


def test_mask_semantics_are_in_the_docstring():
    doc = inspect.getdoc(sigattn.sigmoid_attn_func)
    assert "1 1 1 1 0" in doc and "window_size=(left, right)" in doc  # the drawn causal mask, the window
    assert issubclass(sigattn.BackendNotSupportedError, ValueError)
    assert sigattn.BackendNotSupportedError.__doc__
