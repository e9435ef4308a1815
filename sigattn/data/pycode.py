"""A corpus of Python source code built from the installed environment: every machine with sigattn installed
holds one (its standard library and site-packages), so it needs no download and ships no third-party text.

``load_pycode()`` builds it once into the cache folder and reads it from there afterwards:

    $SIGATTN_CACHE_DIR, else $XDG_CACHE_HOME/sigattn, else ~/.cache/sigattn   /  pycode-<key>/
        manifest.json    what the corpus holds (``PyCodeCorpus.manifest``); written last
        tokenizer.json   the byte-level BPE (``BPETokenizer.state()``, as a run's tokenizer.json)
        train.bin        the training token ids, uint16 (uint32 for a vocabulary past 65,536), for np.memmap
        val.bin          the validation token ids, the same way
        files.jsonl      one line per file taken: name, sha256, bytes, tokens, split

``<key>`` is a hash of the parameters (roots, max_bytes, vocab_size, val_fraction, the tokenizer sample, the
Python and ``tokenizers`` versions, the format), so each set of parameters has its own folder and is built
only once; ``rebuild=True`` builds it again (say after installing packages: the files are not re-read to
notice). The build, step by step:

1. **List** every ``*.py`` file under the roots (default: sysconfig's stdlib, purelib and platlib), skipping
   ``__pycache__``. Symlinked folders are not followed, so a symlink loop is never entered; a root inside
   another root (site-packages inside the stdlib folder) is walked once, as its own. A file's *name* is its
   path under its root, ``stdlib/`` first for the standard library; its *package* is the name's first part
   (``stdlib``, ``torch``, ``six`` for ``six.py``).
2. **Order** by the sha256 of the name (then the path): a fixed shuffle, so that a slice holds some of every
   package rather than the alphabetically first ones, the same on every machine with the same packages.
3. **Read** in that order. Skipped: a file that cannot be read (no permission, a dangling or looping
   symlink, not a regular file), one that is not UTF-8, an empty one, one whose bytes (sha256) were taken
   already (a duplicate: the first in the order is kept), and with ``max_bytes`` one that would take the
   total past it (judged by its size before reading, so a small slice reads only what it takes; later,
   smaller files may still fit). ``manifest["files"]`` counts each reason; they add up to ``listed``.
4. **Split by file**, by content: a file is validation when ``int(sha256[:8], 16) / 16**8 < val_fraction``,
   so its split depends on its bytes alone and adding or removing other files never moves it.
5. **Tokenizer**: a byte-level BPE (``BPETokenizer``) learnt from the training files only, in the order of
   step 2 up to ``TOKENIZER_SAMPLE_BYTES`` (a fixed sample bounds the time: BPE learning reads all it is
   given, and beyond tens of MB more text changes few merges).
6. **Tokens**: each file is encoded on its own and the files follow one another in the order of step 2, with
   no separator token (a new module's header shows where a file starts, and any BPE round-trips), into
   train.bin and val.bin.

The ``fingerprint`` is a sha256 of the parameters but the roots' locations, and of every file taken (its
split, content hash and name, in order): two builds with the same fingerprint hold the same text, however the
environment's folders are named. Results that train on the corpus copy ``manifest`` (the trainer writes it to
the run's data.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import stat
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .shakespeare import CorpusUnavailableError, cache_dir
from .tokenizer import BPETokenizer, _import_tokenizers, tokenizer_from_state

FORMAT = 1  # of the folder's files; a new format builds a new folder
DEFAULT_VOCAB_SIZE = 32768  # the code-gpt preset's (a power of two: the embedding's rows tile evenly)
DEFAULT_VAL_FRACTION = 0.01  # about 3 MB of validation text from a 300 MB environment
# The BPE learns from at most this much training text. 30 MB took 15 s to learn 32,768 ids on this
# project's 2-core CPU (tokenizers 0.23.3); encoding, not learning, is then most of a build.
TOKENIZER_SAMPLE_BYTES = 64 << 20
ENCODE_BATCH_BYTES = 16 << 20  # files encoded per call of the library's parallel batch encoder
SPLITS = ("train", "val")
SOURCE_SUFFIX = ".py"
SKIP_DIRS = frozenset({"__pycache__"})
STDLIB = "stdlib"  # the package name of the standard library's files


def default_roots() -> list[Path]:
    """The environment's Python source folders: sysconfig's stdlib, purelib and platlib (each once)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(Path(paths[key]).resolve() for key in ("stdlib", "purelib", "platlib")))


def roots_from_path(path: str | None) -> list[Path] | None:
    """The folders of ``data.path``'s form, separated by ``os.pathsep``; None (the environment) for none."""
    if not path:
        return None
    return [Path(part).expanduser() for part in path.split(os.pathsep) if part]


@dataclass(frozen=True)
class Source:
    """A listed file: its name (under its root), its package and where it is."""

    name: str
    package: str
    path: str

    @property
    def order_key(self) -> tuple[str, str]:
        """Step 2's order: the sha256 of the name, then the path for two files of the same name."""
        return hashlib.sha256(self.name.encode("utf-8", "surrogateescape")).hexdigest(), self.path


def list_sources(roots: Sequence[Path]) -> list[Source]:
    """Every ``*.py`` file under ``roots`` (step 1), in step 2's order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    root_strings = {str(root) for root in roots}
    sources = []
    for root in roots:
        prefix = f"{STDLIB}/" if root == stdlib else ""
        for folder, dirs, files in os.walk(root):  # followlinks=False: a symlink loop is never entered
            # A nested root is walked as its own, so its files are listed once, under its names.
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and os.path.join(folder, d) not in root_strings]
            for file in files:
                if file.endswith(SOURCE_SUFFIX):
                    path = os.path.join(folder, file)
                    name = prefix + Path(os.path.relpath(path, root)).as_posix()
                    package = name.split("/", 1)[0].removesuffix(SOURCE_SUFFIX)
                    sources.append(Source(name, package, path))
    return sorted(sources, key=lambda s: s.order_key)


@dataclass
class Taken:
    """A file taken into the corpus: its source, text and content hash."""

    source: Source
    text: str
    size: int
    sha256: str

    def split(self, val_fraction: float) -> str:
        """Step 4: "val" when the first 32 bits of the content hash, as a fraction of 2**32, are below
        ``val_fraction``."""
        return "val" if int(self.sha256[:8], 16) / 16**8 < val_fraction else "train"


SKIP_REASONS = ("duplicates", "empty", "unreadable", "not_utf8", "beyond_max_bytes")


def read_sources(sources: Sequence[Source], max_bytes: int | None) -> tuple[list[Taken], dict[str, int]]:
    """Step 3: the files taken, in order, and how many were skipped for each of ``SKIP_REASONS``."""
    taken, seen, total = [], set(), 0
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    for source in sources:
        try:
            info = os.stat(source.path)
            if not stat.S_ISREG(info.st_mode):  # a FIFO named x.py would block the read
                raise OSError("not a regular file")
            if max_bytes is not None and total + info.st_size > max_bytes:
                skipped["beyond_max_bytes"] += 1
                continue
            data = Path(source.path).read_bytes()
        except OSError:
            skipped["unreadable"] += 1
            continue
        if not data:
            skipped["empty"] += 1
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped["not_utf8"] += 1
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            skipped["duplicates"] += 1
            continue
        if max_bytes is not None and total + len(data) > max_bytes:  # it grew since its stat
            skipped["beyond_max_bytes"] += 1
            continue
        seen.add(digest)
        total += len(data)
        taken.append(Taken(source, text, len(data), digest))
    return taken, skipped


def tokenizer_sample(texts: Sequence[str], limit: int = TOKENIZER_SAMPLE_BYTES) -> list[str]:
    """Step 5's sample: the first texts while their UTF-8 size stays within ``limit`` (at least one)."""
    sample, size = [], 0
    for text in texts:
        size += len(text.encode("utf-8"))
        if sample and size > limit:
            break
        sample.append(text)
    return sample


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_tokens(tokenizer: BPETokenizer, texts: Sequence[str], path: Path, dtype: np.dtype) -> tuple[list[int], str]:
    """Step 6 for one split: the texts' ids, one file after another, written to ``path``; returns each text's
    number of tokens and the sha256 of the file."""
    counts, digest = [], hashlib.sha256()
    with open(path, "wb") as out:
        start = 0
        while start < len(texts):
            stop, size = start, 0
            while stop < len(texts) and (stop == start or size < ENCODE_BATCH_BYTES):
                size += len(texts[stop])
                stop += 1
            for ids in tokenizer.encode_batch(list(texts[start:stop])):
                array = np.asarray(ids, dtype=dtype)
                digest.update(array.tobytes())
                array.tofile(out)
                counts.append(len(ids))
            start = stop
    return counts, digest.hexdigest()


# ------------------------------------------------------------------------------------------ the corpus


class PyCodeCorpus:
    """A built corpus in its folder: ``manifest`` (what it holds, to copy into every result that uses it),
    ``tokenizer``, ``tokens(split)`` and ``files()``."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder = folder
        self.manifest = manifest
        self.tokenizer = tokenizer_from_state(json.loads((folder / "tokenizer.json").read_text()))

    @property
    def fingerprint(self) -> str:
        """The sha256 that names the corpus's contents (see the module's docstring)."""
        return self.manifest["fingerprint"]

    @property
    def description(self) -> str:
        """One line: what the corpus is, its size and its fingerprint."""
        m = self.manifest
        where = "the environment" if m["params"]["roots"] is None else ", ".join(m["roots"])
        total = m["train"]["bytes"] + m["val"]["bytes"]
        return (
            f"Python source files of {where} ({m['python']}): {m['files']['taken']:,} files, {total / 1e6:.1f} MB, "
            f"pycode fingerprint {self.fingerprint[:12]}"
        )

    def tokens(self, split: str) -> np.memmap:
        """The token ids of ``split`` ("train" or "val"), memory-mapped read-only."""
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        count = self.manifest[split]["tokens"]  # never 0: each split holds a non-empty file
        return np.memmap(self.folder / f"{split}.bin", dtype=self.manifest["dtype"], mode="r", shape=(count,))

    def files(self) -> list[dict]:
        """Every file taken, in the stream's order: name, package, sha256, bytes, tokens, split."""
        with open(self.folder / "files.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f]


def _check_arguments(max_bytes, vocab_size, val_fraction) -> None:
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive int or None (the whole environment), got {max_bytes!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256:
        raise ValueError(
            f"vocab_size must be an int of at least 256 (the byte-level BPE's 256 bytes, then its merges), "
            f"got {vocab_size!r}"
        )
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")


def _resolve_roots(roots: Sequence[str | Path]) -> list[Path]:
    if isinstance(roots, str | Path):  # a string would be read as a list of one-letter folders
        raise ValueError(f"roots must be a list of folders (or None for the environment), got {roots!r}")
    if not roots:
        raise ValueError("roots must name at least one folder (or be None for the environment), got none")
    resolved = []
    for root in roots:
        path = Path(root).expanduser()
        if not path.is_dir():
            what = "not a folder" if path.exists() else "no such folder"
            raise ValueError(f"roots: {what}: {root}")
        resolved.append(path.resolve())
    return list(dict.fromkeys(resolved))


def pycode_params(
    roots: Sequence[str | Path] | None = None,
    *,
    max_bytes: int | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> dict:
    """The parameters that decide a build (and its cache folder), checked: ValueError naming the argument."""
    _check_arguments(max_bytes, vocab_size, val_fraction)
    tokenizers = _import_tokenizers()
    return {
        "format": FORMAT,
        # None: the environment's roots, listed under "roots" at the manifest's top level.
        "roots": None if roots is None else [str(p) for p in _resolve_roots(roots)],
        "max_bytes": max_bytes,
        "vocab_size": vocab_size,
        "val_fraction": float(val_fraction),
        "tokenizer_sample_bytes": TOKENIZER_SAMPLE_BYTES,
        "python": platform.python_version(),
        "tokenizers": tokenizers.__version__,
    }


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _say(line: str) -> None:
    print(f"sigattn: pycode: {line}", file=sys.stderr)


def load_pycode(
    roots: Sequence[str | Path] | None = None,
    *,
    max_bytes: int | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    cache: str | Path | None = None,
    rebuild: bool = False,
) -> PyCodeCorpus:
    """The Python-source corpus of these parameters: read from the cache folder, built there first if it is
    not (or ``rebuild``).

    Args:
        roots: the folders to read; None for the environment's (``default_roots()``).
        max_bytes: take files (in the fixed order) only while their total stays within this many bytes;
            None for all.
        vocab_size: the BPE's vocabulary (at least 256); a small slice may yield fewer ids (the manifest's
            ``tokenizer.vocab_size``).
        val_fraction: the expected fraction of files (by content hash) in the validation split.
        cache: the folder holding the built corpora; None for ``cache_dir()``.
        rebuild: build even when the cache holds this corpus (after the environment changed).

    Raises:
        ValueError: a bad argument (the message names it), or a split with no file (raise ``max_bytes`` or
            change ``val_fraction``).
        CorpusUnavailableError: the roots hold no readable UTF-8 ``*.py`` file.
    """
    params = pycode_params(roots, max_bytes=max_bytes, vocab_size=vocab_size, val_fraction=val_fraction)
    base = Path(cache).expanduser() if cache is not None else cache_dir()
    folder = base / f"pycode-{_digest(params)[:16]}"
    if not rebuild:
        manifest = _cached_manifest(folder, params)
        if manifest is not None:
            return PyCodeCorpus(folder, manifest)
    base.mkdir(parents=True, exist_ok=True)
    # Built in a folder of its own and renamed into place, so a folder with a manifest is always complete;
    # processes building at once (the ranks of a first multi-GPU run) each build, and the first rename wins.
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{folder.name}."))
    try:
        manifest = build_pycode(tmp, params)
        if folder.exists():
            done = None if rebuild else _cached_manifest(folder, params)
            if done is not None:  # another process finished first: keep the files it may be reading
                return PyCodeCorpus(folder, done)
            shutil.rmtree(folder)  # an incomplete build, or with rebuild the old one
        try:
            os.rename(tmp, folder)
        except OSError:
            done = _cached_manifest(folder, params)
            if done is None:
                raise
            return PyCodeCorpus(folder, done)  # another process renamed its build first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PyCodeCorpus(folder, manifest)


def _cached_manifest(folder: Path, params: dict) -> dict | None:
    """The manifest of a complete build of ``params`` in ``folder``, else None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("params") != params:
        return None
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in SPLITS:
        path = folder / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != manifest[split]["tokens"] * itemsize:
            return None
    if not (folder / "tokenizer.json").is_file() or not (folder / "files.jsonl").is_file():
        return None
    return manifest


def build_pycode(folder: Path, params: dict) -> dict:
    """Builds the corpus of ``params`` (from ``pycode_params``) into ``folder`` and returns its manifest,
    written last as manifest.json."""
    started = time.perf_counter()
    roots = default_roots() if params["roots"] is None else [Path(p) for p in params["roots"]]
    sources = list_sources(roots)
    taken, skipped = read_sources(sources, params["max_bytes"])
    where = ", ".join(map(str, roots))
    if not taken:
        raise CorpusUnavailableError(f"no readable UTF-8 *{SOURCE_SUFFIX} file under {where}")
    by_split = {split: [t for t in taken if t.split(params["val_fraction"]) == split] for split in SPLITS}
    for split, files in by_split.items():
        if not files:
            raise ValueError(
                f"the {split} split of the pycode corpus has no file ({len(taken)} taken under {where}, "
                f"val_fraction={params['val_fraction']}): raise max_bytes or change val_fraction"
            )
    _say(f"{len(taken):,} files ({sum(t.size for t in taken) / 1e6:.1f} MB) of {len(sources):,} listed under {where}")

    sample = tokenizer_sample([t.text for t in by_split["train"]])
    tokenizer = BPETokenizer.train(sample, params["vocab_size"])
    dtype = token_dtype(tokenizer.vocab_size)
    _say(
        f"BPE of {tokenizer.vocab_size:,} ids learnt from {len(sample):,} files ({time.perf_counter() - started:.0f} s)"
    )
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer.state()) + "\n")

    splits, tokens_of = {}, {}
    for split, files in by_split.items():
        counts, digest = write_tokens(tokenizer, [t.text for t in files], folder / f"{split}.bin", dtype)
        tokens_of.update(zip((t.sha256 for t in files), counts, strict=True))
        splits[split] = {
            "files": len(files),
            "bytes": sum(t.size for t in files),
            "tokens": sum(counts),
            "sha256": digest,
        }
    records = [
        {
            "name": t.source.name,
            "package": t.source.package,
            "sha256": t.sha256,
            "bytes": t.size,
            "tokens": tokens_of[t.sha256],
            "split": t.split(params["val_fraction"]),
        }
        for t in taken
    ]
    with open(folder / "files.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)

    packages: dict[str, dict[str, int]] = {}
    for t in taken:
        entry = packages.setdefault(t.source.package, {"files": 0, "bytes": 0})
        entry["files"] += 1
        entry["bytes"] += t.size
    identity = [f"{r['split']} {r['sha256']} {r['name']}" for r in records]
    manifest = {
        "dataset": "pycode",
        "fingerprint": _digest({"params": {**params, "roots": None}, "files": identity}),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "roots": [str(root) for root in roots],
        "params": params,
        "files": {"listed": len(sources), "taken": len(taken), **skipped},
        "train": splits["train"],
        "val": splits["val"],
        "tokenizer": {
            "kind": "bpe",
            "vocab_size": tokenizer.vocab_size,
            "sample_files": len(sample),
            "sample_bytes": sum(len(text.encode("utf-8")) for text in sample),
        },
        "dtype": dtype.name,
        "packages": dict(sorted(packages.items())),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _say(f"built in {time.perf_counter() - started:.0f} s: {splits['train']['tokens']:,} training tokens")
    return manifest
