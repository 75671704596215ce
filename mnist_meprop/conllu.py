"""CoNLL-U treebanks: a strict reader, and UD English-EWT r2.16 (the POS-tagging and parsing data).

The paper's POS-tagging and parsing rows used the Penn Treebank, which is not free; this project
uses UD English-EWT r2.16 (CC BY-SA 4.0), whose XPOS column holds gold Penn-Treebank-style tags
and whose HEAD / DEPREL columns hold gold dependency trees. The three release files are taken
from ``<data_dir>/ud-english-ewt/`` (plain or gzipped) or downloaded there and checked by sha256.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError
from .log import to_stderr

EWT_FOLDER = "ud-english-ewt"
EWT_URL = "https://raw.githubusercontent.com/UniversalDependencies/UD_English-EWT/r2.16/{name}"
EWT_FILES = {  # split -> (file name, sha256 of the uncompressed file)
    "train": ("en_ewt-ud-train.conllu", "3fb78e2b55482c8ee00caa653af436c88c9e5bc9a73ce26e4ae3ddc79d2b7e7b"),
    "dev": ("en_ewt-ud-dev.conllu", "531a54ff90d6ab12201c5a50c3e78e6ddac4de69abc4bce5d275d3cd29efe2b6"),
    "test": ("en_ewt-ud-test.conllu", "e266e515a0a7547657ed3d90d9ba46487d6bd251f27ad4269d4e8a427c8555cd"),
}
COLUMNS = 10
DOWNLOAD_TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class Sentence:
    """One sentence's syntactic words (multi-word tokens and empty nodes left out)."""

    words: tuple[str, ...]
    upos: tuple[str, ...]
    xpos: tuple[str, ...]
    heads: tuple[int, ...]  # 0 is the root; word i (1-based) has head heads[i - 1]
    relations: tuple[str, ...]


def read_conllu(path: Path, text: str | None = None) -> list[Sentence]:
    """The sentences of a CoNLL-U file (``text``, if given, is its content). Anything malformed is a
    :class:`DatasetError` naming the file and line: a wrong column count, a non-numeric or
    out-of-order ID, a missing tag (``_`` in XPOS), a head outside the sentence."""
    if text is None:
        text = _read_text(path)
    sentences: list[Sentence] = []
    rows: list[tuple[int, list[str]]] = []

    def finish() -> None:
        if not rows:
            return
        size = len(rows)
        for number, columns in rows:
            head = columns[6]
            if not head.isdigit() or int(head) > size:
                raise DatasetError(f"{path}:{number}: HEAD {head!r} is not a word of its sentence (0-{size})")
        sentences.append(Sentence(*(tuple(columns[i] for _, columns in rows) for i in (1, 3, 4)),
                                  tuple(int(columns[6]) for _, columns in rows),
                                  tuple(columns[7] for _, columns in rows)))
        rows.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            finish()
            continue
        if line.startswith("#"):
            continue
        columns = line.split("\t")
        if len(columns) != COLUMNS:
            raise DatasetError(f"{path}:{number}: expected {COLUMNS} tab-separated columns, got {len(columns)}")
        word_id = columns[0]
        if "-" in word_id or "." in word_id:  # a multi-word token's range, or an empty node
            continue
        if not word_id.isdigit() or int(word_id) != len(rows) + 1:
            raise DatasetError(f"{path}:{number}: word ID {word_id!r} where {len(rows) + 1} was expected")
        if not columns[1]:
            raise DatasetError(f"{path}:{number}: empty word form")
        if columns[4] in ("", "_"):
            raise DatasetError(f"{path}:{number}: the XPOS tag (column 5) is missing")
        rows.append((number, columns))
    finish()
    if not sentences:
        raise DatasetError(f"{path}: no sentences")
    return sentences


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DatasetError(f"{path}: unreadable ({getattr(error, 'strerror', None) or error})") from None
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def ewt_folder(data_dir: str | None) -> Path:
    """Where the EWT files are kept: ``<data_dir or data>/ud-english-ewt``."""
    return Path(data_dir or "data") / EWT_FOLDER


def _local_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.exists():
            return candidate
    return None


def _download(name: str, digest: str, folder: Path) -> Path:
    url = EWT_URL.format(name=name)
    to_stderr(f"downloading {url} into {folder}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
            content = response.read()
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise DatasetError(f"could not download {url} ({reason}); put the three UD English-EWT r2.16 files "
                           f"({', '.join(n for n, _ in EWT_FILES.values())}, plain or .gz) in {folder}") from None
    if hashlib.sha256(content).hexdigest() != digest:
        raise DatasetError(f"{url}: the download's sha256 is not r2.16's ({digest[:12]}...); not kept")
    fd, temp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
    os.replace(temp, folder / name)
    return folder / name


def load_ewt(data_dir: str | None) -> tuple[dict[str, list[Sentence]], str]:
    """EWT's train / dev / test sentences and a description of where they came from.

    Files missing from the folder are downloaded (and checked against r2.16's sha256); a local
    file with another checksum is used, with a warning (e.g. another release on purpose).
    """
    folder = ewt_folder(data_dir)
    splits = {}
    for split, (name, digest) in EWT_FILES.items():
        path = _local_file(folder, name) or _download(name, digest, folder)
        text = _read_text(path)
        if hashlib.sha256(text.encode("utf-8")).hexdigest() != digest:
            to_stderr(f"warning: {path} is not UD English-EWT r2.16 (sha256 differs); using it as it is")
        splits[split] = read_conllu(path, text)
    return splits, f"UD English-EWT r2.16 in {folder}"
