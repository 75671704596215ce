"""Durable run storage: ``runs.jsonl`` keyed by run, and per-epoch checkpoints for resuming.

Nothing a finished run produced may be lost to a crash or an interrupt: each record is one
line written with a single ``write`` and fsynced; a torn last line (a crash mid-write) is
skipped with a warning; checkpoints are written to a temporary file and renamed over the
old one, so a checkpoint on disk is always complete. Several processes may share one output
folder: a run being trained holds an advisory lock (``.locks/<key>.lock``) that the others
see, so each run is trained once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch

from .config import Config, resolve_auto_engine
from .log import to_stderr

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process locks, one process per output folder
    fcntl = None

RUNS_FILE = "runs.jsonl"
# Timings taken after a run (meSimp's compact-model inference), measured once and kept beside its record.
INFERENCE_FILE = "inference-timings.jsonl"
CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "models"
LOCK_DIR = ".locks"


# Keys are hashed against these values, not today's defaults, so that a default changing keeps
# old run keys: sparse_update's values were stored as booleans (false, the dense update, was the
# default) before it had three values and "exact" became the default; every run went through
# autograd before engine: auto (fused where it applies) became the default.
_KEY_BASELINE = {**Config().to_dict(), "sparse_update": False, "engine": "autograd"}
_KEY_SPELLING = {"sparse_update": {"dense": False, "lazy": True}}


def run_key(config: Config) -> str:
    """A stable hash of the resolved settings (seed included): the identity of a run.

    ``name`` only labels the output, and ``preset`` only names where the settings came from
    (they are in the config, resolved), so both are left out: the same settings under two
    names are one run. Settings at their original default value are left out too, so adding a
    new option (with a default that keeps the old behaviour) does not change existing keys.
    An ``engine: auto`` not yet resolved (a ``Config`` built without validation) is resolved
    first, as loading would.
    """
    if config.engine == "auto":
        config = dataclasses.replace(config, engine=resolve_auto_engine(config))
    settings = {key: _KEY_SPELLING[key].get(value, value) if key in _KEY_SPELLING else value
                for key, value in config.to_dict().items() if key not in ("name", "preset")}
    settings = {key: value for key, value in settings.items() if value != _KEY_BASELINE[key]}
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_record(out_dir: Path, record: dict[str, Any], file: str = RUNS_FILE) -> None:
    """Append one record to ``out_dir/<file>`` (default: the runs, ``runs.jsonl``) as one line, flushed and
    fsynced."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / file
    line = json.dumps(record) + "\n"
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":  # a torn line from a crash: keep it apart from this record
                line = "\n" + line
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def read_records(out_dir: Path, warn: Callable[[str], None] | None = None,
                 file: str = RUNS_FILE) -> list[dict[str, Any]]:
    """All complete records in ``out_dir/<file>`` (default ``runs.jsonl``); unreadable lines are skipped with a
    warning."""
    warn = warn or to_stderr
    path = out_dir / file
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            warn(f"warning: {path} line {number} is incomplete (a run interrupted while writing?); skipped")
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def latest_by_key(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The newest record of each run key (a ``--fresh`` rerun supersedes the older record)."""
    return {record["key"]: record for record in records if "key" in record}


def checkpoint_path(out_dir: Path, key: str) -> Path:
    return out_dir / CHECKPOINT_DIR / f"{key}.pt"


def model_path(out_dir: Path, key: str) -> Path:
    """Where a run's best-dev model is kept (for ``meprop export``)."""
    return out_dir / MODEL_DIR / f"{key}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` to a temporary file, fsync it and rename it over ``path``."""
    for attempt in range(3):  # another process may remove the empty folder between mkdir and mkstemp
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None if there is none (or it cannot be read)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged checkpoint only costs the epochs since the run started
        to_stderr(f"warning: checkpoint {path} unreadable ({error}); the run starts over")
        return None


def remove_checkpoint(path: Path) -> None:
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass


@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """Within the block, hold an exclusive ``flock`` on ``path``; yields whether it is held. With
    ``wait=False`` it gives up at once (False) when another process holds it. Off POSIX there are
    no such locks: it yields True."""
    if fcntl is None:
        yield True
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def claim_run(out_dir: Path, key: str) -> AbstractContextManager[bool]:
    """Within the block, hold the run's lock if no other process holds it; yields whether it does.

    The lock is an ``flock`` on ``out_dir/.locks/<key>.lock``: the operating system drops it
    when its process ends, however it ends, so a killed process never leaves a run claimed.
    """
    folder = out_dir / LOCK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return file_lock(folder / f"{key}.lock", wait=False)
