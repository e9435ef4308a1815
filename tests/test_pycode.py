"""sigattn.data.pycode: the Python-source corpus of the environment. On a tree of files the tests write
(duplicates, a file that is not UTF-8, an empty one, symlink loops, a dangling link, a FIFO, __pycache__, a
root inside a root): what is listed, skipped and taken, and the manifest's counts against the files; the split
by file (by content hash, unmoved when a file is added); the token streams decode to the files' texts. On a
slice of a few hundred KB of this environment: two builds are byte-identical, the cache is reused, the
code-gpt preset trains 3 steps on it through ``sigattn train`` and its run copies the manifest. Bad arguments
are refused naming the argument. No test reads more than the slice, so the file runs in seconds."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import pytest
import torch

from sigattn import cli
from sigattn.data import CorpusUnavailableError, default_roots, load_pycode
from sigattn.data import pycode as pycode_module
from sigattn.models import GPT
from sigattn.train import ConfigError, build_config
from sigattn.train.tasks import LMTask

WORDS = ["value", "count", "token", "window", "layer", "scale", "bias", "query", "key", "cache", "route", "mask"]
SLICE = {"max_bytes": 300_000, "vocab_size": 512, "val_fraction": 0.25}  # of this environment's files
SKIPPED = {"duplicates": 2, "empty": 1, "unreadable": 3, "not_utf8": 1, "beyond_max_bytes": 0}


def module_text(rng: random.Random, index: int) -> str:
    """A small, distinct Python module."""
    lines = [f'"""Module {index}: Ünïcødé — 日本語 🐍."""', "", "import math", ""]
    for j in range(rng.randint(4, 9)):
        name = f"{rng.choice(WORDS)}_{rng.choice(WORDS)}_{j}"
        lines += [f"def {name}({rng.choice(WORDS)}, n={rng.randint(0, 99)}):", f"    return math.sqrt(n) * {j}", ""]
    return "\n".join(lines)


def write_tree(root: Path, modules: int = 24, seed: int = 0) -> Path:
    """A source tree with every kind of file the build must take or skip; returns ``root``."""
    rng = random.Random(seed)
    for i in range(modules):
        path = root / f"pkg{i % 3}" / f"mod{i}.py" if i % 4 else root / f"top{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(module_text(rng, i), encoding="utf-8")
    (root / "pkg0" / "copy.py").write_bytes((root / "pkg0" / "mod3.py").read_bytes())  # a duplicate
    os.symlink("top0.py", root / "alias.py")  # a link to a file: the same bytes again
    (root / "gamma").mkdir()
    (root / "gamma" / "latin.py").write_bytes(b"# caf\xe9 au lait\nx = 1\n")  # Latin-1, not UTF-8
    (root / "empty.py").write_bytes(b"")
    os.symlink("loop.py", root / "loop.py")  # a symlink loop
    os.symlink("nowhere.py", root / "dangling.py")
    os.mkfifo(root / "fifo.py")  # reading it would block: skipped as not a regular file
    os.symlink("..", root / "pkg1" / "up")  # a folder loop: not followed
    (root / "pkg2" / "__pycache__").mkdir()
    (root / "pkg2" / "__pycache__" / "cached.py").write_text("skipped = True\n")
    (root / "notes.txt").write_text("not Python\n")
    return root


def build(root: Path, cache: Path, **options) -> pycode_module.PyCodeCorpus:
    return load_pycode([root], **{"vocab_size": 300, "val_fraction": 0.5, "cache": cache, **options})


@pytest.fixture
def tree(tmp_path) -> Path:
    return write_tree(tmp_path / "site")


def text_of(root: Path, name: str) -> str:
    return (root / name).read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------- a tree of files


def test_listed_skipped_and_taken_files_add_up(tree, tmp_path):
    corpus = build(tree, tmp_path / "cache")
    m, files = corpus.manifest, corpus.files()
    # 24 modules + copy, alias, latin, empty, loop, dangling, fifo; not __pycache__/, pkg1/up/ or notes.txt
    assert m["files"] == {"listed": 31, "taken": 24, **SKIPPED}
    assert len(files) == 24 == m["train"]["files"] + m["val"]["files"]
    names = [f["name"] for f in files]
    assert len(set(names)) == len(names) and not any("__pycache__" in n or "up/" in n for n in names)
    assert len({f["sha256"] for f in files}) == len(files)  # deduplicated by content
    assert len({"pkg0/copy.py", "pkg0/mod3.py"} & set(names)) == 1 and len({"alias.py", "top0.py"} & set(names)) == 1
    for f in files:
        assert f["bytes"] == len(text_of(tree, f["name"]).encode("utf-8"))
        assert f["package"] == f["name"].split("/")[0].removesuffix(".py")
    for split in ("train", "val"):
        mine = [f for f in files if f["split"] == split]
        assert m[split]["bytes"] == sum(f["bytes"] for f in mine)
        assert m[split]["tokens"] == sum(f["tokens"] for f in mine) == len(corpus.tokens(split))
    packages = {}
    for f in files:
        packages.setdefault(f["package"], {"files": 0, "bytes": 0})
        packages[f["package"]]["files"] += 1
        packages[f["package"]]["bytes"] += f["bytes"]
    twin = "alias" if "alias.py" in names else "top0"  # whichever of the two comes first in the order
    assert m["packages"] == packages
    assert set(packages) == {"pkg0", "pkg1", "pkg2", twin, *(f"top{i}" for i in range(4, 24, 4))}
    assert m["roots"] == [str(tree.resolve())] and m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] <= 300


def test_a_root_inside_a_root_is_listed_once(tree, tmp_path):
    corpus = load_pycode([tree, tree / "pkg1"], vocab_size=300, val_fraction=0.5, cache=tmp_path / "cache")
    alone = build(tree, tmp_path / "cache")
    assert corpus.manifest["files"] == alone.manifest["files"]
    assert {f["sha256"] for f in corpus.files()} == {f["sha256"] for f in alone.files()}
    assert any(f["name"].startswith("mod") for f in corpus.files())  # pkg1's files, named under their own root


def test_the_streams_decode_to_the_files_in_order(tree, tmp_path):
    corpus = build(tree, tmp_path / "cache")
    for split in ("train", "val"):
        expected = "".join(text_of(tree, f["name"]) for f in corpus.files() if f["split"] == split)
        ids = corpus.tokens(split)
        assert ids.dtype.name == "uint16" and int(ids.max()) < corpus.tokenizer.vocab_size
        assert corpus.tokenizer.decode(ids.tolist()) == expected
        assert corpus.tokenizer.encode_batch([expected]) == [corpus.tokenizer.encode(expected)]


def test_files_are_split_by_content_and_stay_put_when_one_is_added(tree, tmp_path):
    corpus = build(tree, tmp_path / "cache")
    before = {f["sha256"]: f["split"] for f in corpus.files()}
    assert set(before.values()) == {"train", "val"}
    for sha, split in before.items():
        assert split == ("val" if int(sha[:8], 16) / 16**8 < 0.5 else "train")
    (tree / "pkg0" / "added.py").write_text(module_text(random.Random(99), 99), encoding="utf-8")
    again = build(tree, tmp_path / "cache", rebuild=True)
    after = {f["sha256"]: f["split"] for f in again.files()}
    assert len(after) == len(before) + 1 and all(after[sha] == split for sha, split in before.items())
    assert again.fingerprint != corpus.fingerprint


def test_max_bytes_takes_a_fixed_slice(tree, tmp_path):
    whole = build(tree, tmp_path / "cache")
    total = whole.manifest["train"]["bytes"] + whole.manifest["val"]["bytes"]
    part = build(tree, tmp_path / "cache", max_bytes=total // 2)
    m = part.manifest
    assert total // 3 < m["train"]["bytes"] + m["val"]["bytes"] <= total // 2
    assert m["files"]["beyond_max_bytes"] > 0 and m["files"]["listed"] == sum(
        v for k, v in m["files"].items() if k != "listed"
    )
    assert {f["sha256"] for f in part.files()} < {f["sha256"] for f in whole.files()}
    order = [f["sha256"] for f in whole.files()]
    assert [f["sha256"] for f in part.files()] == [s for s in order if s in {f["sha256"] for f in part.files()}]


@pytest.mark.parametrize(
    "roots, options, error, message",
    [
        ("tree", {"max_bytes": 0}, ValueError, "max_bytes must be a positive int or None"),
        ("tree", {"max_bytes": -5}, ValueError, "max_bytes must be a positive int or None"),
        ("tree", {"max_bytes": 1.5}, ValueError, "max_bytes must be a positive int or None"),
        ("tree", {"vocab_size": 100}, ValueError, "vocab_size must be an int of at least 256"),
        ("tree", {"val_fraction": 1.0}, ValueError, r"val_fraction must be a number in \(0, 1\)"),
        ("tree", {"val_fraction": 1e-9}, ValueError, "the val split of the pycode corpus has no file.*raise max_bytes"),
        ("missing", {}, ValueError, "roots: no such folder: .*missing"),
        ("a file", {}, ValueError, "roots: not a folder: .*notes.txt"),
        ("a string", {}, ValueError, "roots must be a list of folders"),
        ("none", {}, ValueError, "roots must name at least one folder"),
        ("empty", {}, CorpusUnavailableError, r"no readable UTF-8 \*.py file under .*empty"),
    ],
)
def test_bad_arguments_are_named(tree, tmp_path, roots, options, error, message):
    (tmp_path / "empty").mkdir()
    given = {
        "tree": [tree],
        "missing": [tmp_path / "missing"],
        "a file": [tree / "notes.txt"],
        "a string": str(tree),
        "none": [],
        "empty": [tmp_path / "empty"],
    }[roots]
    with pytest.raises(error, match=message):
        load_pycode(given, **{"vocab_size": 300, "val_fraction": 0.5, "cache": tmp_path / "cache", **options})
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing half-built


def test_the_data_command_prints_the_manifest(tree, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SIGATTN_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["data", "pycode", "--path", str(tree), "--vocab-size", "300", "--val-fraction", "0.5"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    corpus = build(tree, tmp_path / "cache")
    assert json.loads(out) == corpus.manifest and str(corpus.folder) in err
    assert cli.main([*argv, "--max-bytes", "0"]) == 2
    assert "sigattn data: error: max_bytes must be a positive int" in capsys.readouterr().err
    assert cli.main(["data", "pycode", "--path", str(tmp_path / "missing")]) == 2
    assert "roots: no such folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------- this environment


@pytest.fixture(scope="module")
def env_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pycode-cache")


def test_the_environment_is_listed_once_with_the_stdlib_named(tmp_path):
    sources = pycode_module.list_sources(default_roots())
    paths = [os.path.realpath(s.path) for s in sources]
    assert len(set(paths)) == len(paths)  # site-packages inside the stdlib folder is walked once
    names = {s.name: s.package for s in sources}
    assert names["stdlib/os.py"] == "stdlib" and names["torch/__init__.py"] == "torch"
    assert not any("__pycache__" in s.path for s in sources)


def test_two_builds_are_identical_and_the_cache_is_reused(env_cache, tmp_path, monkeypatch):
    first = load_pycode(**SLICE, cache=env_cache)
    second = load_pycode(**SLICE, cache=tmp_path / "other")
    assert first.manifest == second.manifest and first.folder.name == second.folder.name
    for name in ("manifest.json", "tokenizer.json", "train.bin", "val.bin", "files.jsonl"):
        assert (first.folder / name).read_bytes() == (second.folder / name).read_bytes(), name
    m = first.manifest
    assert m["params"]["roots"] is None and m["python"].endswith(m["params"]["python"])
    assert m["train"]["bytes"] + m["val"]["bytes"] <= SLICE["max_bytes"] and m["dtype"] == "uint16"

    def fail(*args):
        raise AssertionError("rebuilt a cached corpus")

    monkeypatch.setattr(pycode_module, "build_pycode", fail)
    assert load_pycode(**SLICE, cache=env_cache).manifest == m
    with pytest.raises(AssertionError, match="rebuilt"):  # other parameters: another corpus
        load_pycode(**{**SLICE, "vocab_size": 600}, cache=env_cache)


def test_code_gpt_is_gpt2_small_shaped_with_the_sigmoid_recipe():
    config = build_config("code-gpt")
    model, data = config.model, config.data
    assert (model.n_layer, model.d_model, model.n_head, model.head_dim, model.block_size) == (12, 768, 12, 64, 1024)
    assert (model.attn, model.qk_norm, model.norm_style, model.pos, model.bias_init) == (
        "sigmoid",
        "layernorm",
        "hybrid",
        "rope",
        None,  # -log(block_size)
    )
    assert (data.dataset, data.tokenizer) == ("pycode", "bpe") and config.train.precision == "auto"
    # `sigattn data pycode` with its defaults builds the preset's corpus
    assert (data.vocab_size, data.val_fraction) == (
        pycode_module.DEFAULT_VOCAB_SIZE,
        pycode_module.DEFAULT_VAL_FRACTION,
    )
    with torch.device("meta"):
        gpt = GPT(dataclasses.replace(model, vocab_size=data.vocab_size))
    assert 100e6 < sum(p.numel() for p in gpt.parameters()) < 120e6
    with pytest.raises(ConfigError, match="max_bytes must be a positive int or none"):
        build_config("code-gpt", ["data.max_bytes=0"])
    with pytest.raises(ConfigError, match="dataset='pycode' is tokenised by its own BPE"):
        build_config("code-gpt", ["data.tokenizer=char"])
    with pytest.raises(ConfigError, match="max_bytes is for dataset='pycode' only"):
        build_config("tiny", ["data.max_bytes=100"])


def shrunk(out: Path) -> list[str]:
    """code-gpt at a size that takes a fraction of a second a step, on the slice."""
    return [
        "--preset=code-gpt",
        f"--out={out}",
        "--max-steps=3",
        "model.n_layer=1",
        "model.d_model=32",
        "model.n_head=2",
        "model.block_size=32",
        f"data.vocab_size={SLICE['vocab_size']}",
        f"data.max_bytes={SLICE['max_bytes']}",
        f"data.val_fraction={SLICE['val_fraction']}",
        "train.batch_size=4",
        "train.eval_every=3",
        "train.eval_windows=2",
        "train.eval_context_lengths=64",
        "train.log_every=1",
        "train.threads=1",
        "train.progress=false",
        "train.plots=false",
        "optim.warmup_steps=1",
    ]


def test_code_gpt_trains_on_a_slice_and_copies_its_manifest(env_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SIGATTN_CACHE_DIR", str(env_cache))
    out = tmp_path / "run"
    assert cli.main(["train", *shrunk(out)]) == 0, capsys.readouterr().err
    corpus = load_pycode(**SLICE, cache=env_cache)
    assert json.loads((out / "data.json").read_text()) == corpus.manifest
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 3 and torch.isfinite(torch.tensor(result["final_val_loss"]))
    assert set(result["val_loss_by_context"]) == {"32", "64"}
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["task"]
    assert saved["pycode_fingerprint"] == corpus.fingerprint
    config = build_config("code-gpt", [a for a in shrunk(out) if not a.startswith("--")])
    with pytest.raises(ValueError, match="is not the one the run started with"):
        LMTask(config, {**saved, "pycode_fingerprint": "0" * 64})
