"""The lab beside the library: ``sigattn.testing`` (correctness grids, the tolerance rule) and ``sigattn.bench``
(``sigattn bench``) use the library; the library never uses them, and they reach it only through public
names. Read from the source with ``ast``, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sigattn"
LAB = ("sigattn.testing", "sigattn.bench")
# The one module outside the lab that may import it: it registers the commands (`sigattn bench`) and
# `sigattn example` checks with the tolerance rule.
WIRES_COMMANDS = {"sigattn.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(absolute module, imported name or None for ``import module``) of every import in ``path``."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found += [(module, alias.name) for alias in node.names]
    return found


def lab_room(module: str) -> str | None:
    """The lab's package holding ``module`` (``sigattn.testing`` or ``sigattn.bench``), else None."""
    return next((room for room in LAB if module == room or module.startswith(room + ".")), None)


def is_private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
LAB_MODULES = [name for name in MODULES if lab_room(name)]


def test_the_lab_is_where_the_tree_says():
    assert {"sigattn.testing.grid", "sigattn.testing.distributed", "sigattn.testing.tolerance"} <= set(LAB_MODULES)
    assert {"sigattn.bench.command", "sigattn.bench.sweep", "sigattn.bench.inference"} <= set(LAB_MODULES)


def test_imports_resolve_relative_names():
    """The parser the other tests rely on: relative imports become absolute module names."""
    found = imports(MODULES["sigattn.testing.grid"])
    assert ("sigattn.runinfo", "run_meta") in found and ("sigattn.testing.tolerance", "max_error") in found
    assert ("sigattn", "sigmoid_attn_func") in found  # `from .. import sigmoid_attn_func`, inside a function
    assert ("sigattn.bench", "command") in imports(MODULES["sigattn.cli"])


def test_plotting_imports_none_of_the_tools_that_draw():
    """``sigattn.plotting`` serves train, experiments and bench (the lab): it imports nothing from sigattn."""
    assert not [module for module, _ in imports(MODULES["sigattn.plotting"]) if module.startswith("sigattn")]


@pytest.mark.parametrize("name", [n for n in MODULES if not lab_room(n) and n not in WIRES_COMMANDS])
def test_the_library_does_not_import_the_lab(name):
    lab = sorted(
        target
        for module, what in imports(MODULES[name])
        for target in (module, f"{module}.{what}")  # `from sigattn import testing` names the lab too
        if lab_room(target)
    )
    assert not lab, f"{name} imports the lab ({', '.join(lab)}); only {', '.join(WIRES_COMMANDS)} may"


@pytest.mark.parametrize("name", LAB_MODULES)
def test_the_lab_uses_public_names_of_other_packages(name):
    private = [
        f"{module}.{what}"
        for module, what in imports(MODULES[name])
        if module.startswith("sigattn")
        and lab_room(module) != lab_room(name)
        and any(is_private(part) for part in [*module.split("."), what or ""])
    ]
    assert not private, f"{name} imports private names of other packages: {', '.join(private)}"
