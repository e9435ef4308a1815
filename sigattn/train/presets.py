"""Presets: version-controlled TOML files in ``sigattn/train/presets/``, one run recipe each.

``build_config("tiny", ["model.n_layer=4"], attn="softmax")`` reads a preset (by name, or a path to any
TOML file of the same form), applies the overrides and returns the checked ``RunConfig``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .config import ConfigError, RunConfig

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    """The names of the bundled presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    """The file of a bundled preset, or ``name`` itself when it is a path to a .toml or .json file."""
    if name.endswith((".toml", ".json")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"--preset: no such preset file {path}")
        return path
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(
            f"--preset: unknown preset {name!r}; expected one of {', '.join(preset_names())} "
            "or a path to a .toml or .json file"
        )
    return path


def load_preset(name: str) -> dict:
    """A preset's settings as a dict (sections as nested dicts). A .json file of the same structure is read
    as JSON (for Python 3.10 without tomli)."""
    path = preset_path(name)
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"--preset: {path} is not valid JSON: {error}") from None
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading presets on Python 3.10 needs tomli: pip install 'sigattn[train]'") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--preset: {path} is not valid TOML: {error}") from None


def build_config(
    preset: str, overrides: list[str] = (), *, attn: str | None = None, max_steps: int | None = None
) -> RunConfig:
    """The preset's config with the overrides applied, then ``attn`` (model.attn) and ``max_steps``
    (train.max_steps) when given."""
    extra = list(overrides)
    if attn is not None:
        extra.append(f"model.attn={attn}")
    if max_steps is not None:
        extra.append(f"train.max_steps={max_steps}")
    return RunConfig.from_dict(load_preset(preset), extra)
