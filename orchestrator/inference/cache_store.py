"""What the disk cache holds per format version and backend id, and pruning it.

Reads the layout of :mod:`orchestrator.inference.cache` (``<cache_dir>/v<N>/<backend dir>/``)
and the layout before format directories existed (format 1: ``<cache_dir>/<backend dir>/``,
``.npz`` entries), which this code no longer reads. Anything else under the cache dir (the
workers' ``.workers/`` incarnation records, foreign files) is neither counted nor deleted.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from orchestrator.inference.cache import BACKEND_LABEL, ENTRY_SUFFIX, FORMAT_DIR

_FORMAT_DIR = re.compile(r"^v(\d+)$")
_BACKEND_DIR = re.compile(r"^[0-9a-f]{16}$")
_ENTRY_DIR = re.compile(r"^[0-9a-f]{2}$")
_LEGACY_SUFFIX = ".npz"


@dataclass(frozen=True)
class BackendUsage:
    """One backend id's entries in one format version."""

    format_version: int
    directory: Path
    backend_id: str
    """From ``BACKEND_ID.txt`` (``"?"`` when missing)."""
    entries: int
    bytes: int
    current: bool
    """Whether this code reads these entries (its format version)."""


@dataclass(frozen=True)
class PruneResult:
    entries: int
    bytes: int


def cache_usage(root: str | os.PathLike[str]) -> list[BackendUsage]:
    """Entries and bytes per (format version, backend id) under ``root``, current format first,
    then by backend id; ``[]`` when ``root`` does not exist."""
    usage = [
        BackendUsage(
            version,
            directory,
            _backend_id(directory),
            sum(1 for _ in entries),
            sum(size for _, size in entries),
            directory.parent.name == FORMAT_DIR,
        )
        for version, directory in _backend_dirs(Path(root))
        for entries in [list(_entries(directory, version))]
    ]
    return sorted(usage, key=lambda u: (not u.current, u.backend_id, u.format_version))


def prune(
    root: str | os.PathLike[str],
    *,
    backend: str | None = None,
    older_than_days: float | None = None,
    other_formats: bool = False,
    now: float | None = None,
) -> PruneResult:
    """Delete the entries that match every filter given (at least one is required):
    ``backend`` (a backend id, or its directory name), ``older_than_days`` (written more than
    that many days before ``now``), ``other_formats`` (entries this code does not read).
    Emptied directories go too. Returns what was deleted."""
    if backend is None and older_than_days is None and not other_formats:
        raise ValueError("prune needs a backend, an age or other_formats")
    now = time.time() if now is None else now
    cutoff = None if older_than_days is None else now - older_than_days * 86400
    deleted = freed = 0
    for version, directory in _backend_dirs(Path(root)):
        if backend is not None and backend not in (directory.name, _backend_id(directory)):
            continue
        if other_formats and directory.parent.name == FORMAT_DIR:
            continue
        for path, size in _entries(directory, version):
            if cutoff is None or path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                deleted, freed = deleted + 1, freed + size
        _remove_if_empty(directory)
    return PruneResult(deleted, freed)


def _backend_dirs(root: Path) -> Iterator[tuple[int, Path]]:
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        match = _FORMAT_DIR.match(child.name)
        if match and child.is_dir():
            for backend_dir in sorted(child.iterdir()):
                if _BACKEND_DIR.match(backend_dir.name) and backend_dir.is_dir():
                    yield int(match.group(1)), backend_dir
        elif _BACKEND_DIR.match(child.name) and child.is_dir():
            yield 1, child


def _entries(backend_dir: Path, version: int) -> Iterator[tuple[Path, int]]:
    suffix = _LEGACY_SUFFIX if version == 1 else ENTRY_SUFFIX
    for sub in backend_dir.iterdir():
        if _ENTRY_DIR.match(sub.name) and sub.is_dir():
            for path in sub.iterdir():
                if path.name.endswith(suffix):
                    try:
                        yield path, path.stat().st_size
                    except FileNotFoundError:
                        continue  # deleted meanwhile (a concurrent prune or corrupt entry)


def _backend_id(backend_dir: Path) -> str:
    try:
        return (backend_dir / BACKEND_LABEL).read_text().strip() or "?"
    except OSError:
        return "?"


def _remove_if_empty(backend_dir: Path) -> None:
    """Remove emptied entry directories, and the backend's directory once it holds no entry
    directory; a writer that added a file meanwhile keeps its directory (``rmdir`` fails)."""
    try:
        for sub in backend_dir.iterdir():
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
        if not any(p.is_dir() for p in backend_dir.iterdir()):
            (backend_dir / BACKEND_LABEL).unlink(missing_ok=True)
            backend_dir.rmdir()
    except OSError:
        pass
