"""Content-addressed cache of segmentation results: a bounded memory LRU over a disk store.

A result is addressed by ``CacheKey(backend_id, image_digest(image), prompt)``, whose ``hex`` is
sha256 over the backend id, the image's sha256 (bytes + shape + dtype) and the prompt text.
Equal keys give equal results; any change of backend, pixels or prompt gives another key, so a
stale answer is never served.

Both tiers hold the compact form of :mod:`orchestrator.inference.cache_entry` (mask bits, ``prob``
quantised to uint8; about 160 KB on disk for a 512x512 Frangi entry instead of float32's 1.06 MB),
and every answer the cache hands out, fresh or hit, is that form expanded: bit-identical
whichever tier served it.

Disk layout (the directory outlives runs and is shared by every worker, trial and run)::

    <cache_dir>/v<FORMAT>/<sha256(backend_id)[:16]>/BACKEND_ID.txt        the backend id
    <cache_dir>/v<FORMAT>/<sha256(backend_id)[:16]>/<key[:2]>/<key>.entry  one result

The format version is part of the path, so code of another format version neither reads nor
deletes these entries. Files are written with :func:`orchestrator.run_dir.write_bytes` (a unique
temp file, fsync, ``os.replace``), so concurrent writers (also on NFS-like storage) and crashes
leave either the old or the new complete file. An entry that does not decode (torn, checksum
mismatch, wrong key or shape) is logged, counted, deleted and reported as a miss; one that cannot
be read (permission, I/O error, stale NFS handle) is logged, counted and kept; neither is ever
returned, and neither fails the request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

from models.segmentation import Segmentation
from orchestrator import run_dir
from orchestrator.disk import DISK_FULL_ERRNOS
from orchestrator.inference.cache_entry import (
    ENTRY_FORMAT_VERSION,
    CompactEntry,
    CorruptEntryError,
    compact,
    decode,
    encode,
    expand,
)

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BYTES = 512 * 2**20
FORMAT_DIR = f"v{ENTRY_FORMAT_VERSION}"
"""The directory of this format version's entries under the cache dir."""
ENTRY_SUFFIX = ".entry"
BACKEND_LABEL = "BACKEND_ID.txt"


class CacheHit(NamedTuple):
    """A cached result and where it came from (``"memory"`` or ``"disk"``)."""

    segmentation: Segmentation
    tier: str


def cache_key(backend_id: str, digest: str, prompt: str) -> str:
    """The cache key (sha256 hex) of one (backend, image digest, prompt) triple."""
    # JSON quoting keeps the three fields unambiguous whatever characters the prompt holds.
    payload = json.dumps([backend_id, digest, prompt], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class CacheKey(NamedTuple):
    """What a cached result is addressed by; ``hex`` is its sha256 key."""

    backend_id: str
    digest: str
    prompt: str

    @property
    def hex(self) -> str:
        return cache_key(self.backend_id, self.digest, self.prompt)

    @property
    def backend_dir(self) -> str:
        """Name of the backend's directory in the disk cache."""
        return backend_dir_name(self.backend_id)


def backend_dir_name(backend_id: str) -> str:
    """Name of a backend id's directory in the disk cache (``<cache_dir>/v<N>/<this>``)."""
    return hashlib.sha256(backend_id.encode()).hexdigest()[:16]


def canonical(seg: Segmentation) -> Segmentation:
    """What the cache returns for a backend's answer ``seg``: ``prob`` quantised
    (:mod:`~orchestrator.inference.cache_entry`), read-only arrays, a Python float score and a
    tuple of str flags; a memory or disk hit later returns identical values."""
    return expand(compact(seg))


class MemoryLRU:
    """A thread-safe LRU of compact entries bounded by the bytes of their arrays."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, CompactEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> CompactEntry | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is not None:
                self._items.move_to_end(key)
            return entry

    def put(self, key: str, entry: CompactEntry) -> None:
        size = entry.nbytes
        if size > self.max_bytes:
            return  # would evict everything else and still not fit
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


class InferenceCache:
    """A memory LRU (bytes-bounded) in front of an optional disk store, for any backend ids.

    Thread-safe. ``get`` returns a :class:`CacheHit` or ``None``; ``put`` stores a result in
    both tiers and returns its canonical form (return that to callers, so a miss and a later hit
    give identical values). ``put`` is ``stage`` (memory, and held for ``get`` whatever the
    memory bound) then ``flush`` (the disk write, a few ms with its fsync): a worker stages under
    its model lock and flushes after releasing it, so the next forward pass overlaps the write
    and a request that waited for the lock still finds the result. Counters: ``memory_hits``
    and ``disk_hits`` (counted by ``get``), ``misses`` (counted by ``stage``: a lookup that finds
    nothing is not yet a miss, the caller may look again after waiting for a lock),
    ``corrupt_entries`` (deleted), ``disk_read_errors`` (kept), ``disk_write_errors``.
    """

    def __init__(
        self, cache_dir: str | os.PathLike[str] | None, memory_bytes: int = DEFAULT_MEMORY_BYTES
    ) -> None:
        self.root = None if cache_dir is None else Path(cache_dir)
        self.memory = MemoryLRU(memory_bytes)
        self.memory_hits = self.disk_hits = self.misses = 0
        self.corrupt_entries = self.disk_read_errors = self.disk_write_errors = 0
        self._labelled: set[str] = set()
        self._lock = threading.Lock()
        self._staged: dict[str, CompactEntry] = {}

    def path(self, key: CacheKey) -> Path | None:
        """Where the entry of ``key`` lives on disk (``None`` without a cache dir)."""
        if self.root is None:
            return None
        digest = key.hex
        return self.root / FORMAT_DIR / key.backend_dir / digest[:2] / f"{digest}{ENTRY_SUFFIX}"

    def get(self, key: CacheKey, hw: tuple[int, int]) -> CacheHit | None:
        """The cached result of ``key`` for an image of height/width ``hw``, or ``None``."""
        entry = self.memory.get(key.hex)
        if entry is None:
            with self._lock:
                entry = self._staged.get(key.hex)
        if entry is not None and entry.shape == tuple(hw):
            self._count("memory_hits")
            return CacheHit(expand(entry), "memory")
        entry = self._read_disk(key, hw)
        if entry is None:
            return None
        self.memory.put(key.hex, entry)
        self._count("disk_hits")
        return CacheHit(expand(entry), "disk")

    def put(self, key: CacheKey, seg: Segmentation) -> Segmentation:
        """Store ``seg`` under ``key`` in memory and on disk; returns the canonical form."""
        seg = self.stage(key, seg)
        self.flush(key)
        return seg

    def stage(self, key: CacheKey, seg: Segmentation) -> Segmentation:
        """Store ``seg`` in memory and hold it for :meth:`get` until :meth:`flush` wrote it to
        disk (also when the memory tier is too small for it); returns the canonical form."""
        entry = compact(seg)
        self._count("misses")
        self.memory.put(key.hex, entry)
        with self._lock:
            self._staged[key.hex] = entry
        return expand(entry)

    def flush(self, key: CacheKey) -> None:
        """Write the entry :meth:`stage` holds for ``key`` to disk and release it (no-op when
        nothing is staged). A failed write is counted and logged; it is raised only when the
        disk is full (``ENOSPC``/``EDQUOT``, naming the entry's path), so that the run stops
        with a message instead of filling every other writer's disk too. Any other failure
        (permission, read-only or stale storage) costs future recomputation only."""
        with self._lock:
            entry = self._staged.get(key.hex)
        if entry is None:
            return
        path = self.path(key)
        try:
            if path is not None:
                self._label_backend_dir(key)
                run_dir.write_bytes(path, encode(key.hex, entry))
        except OSError as err:
            self._count("disk_write_errors")
            log.warning("segmentation cache: could not write %s: %s", path, err)
            if err.errno in DISK_FULL_ERRNOS:
                raise
        finally:
            with self._lock:
                self._staged.pop(key.hex, None)

    def counters(self) -> dict[str, int]:
        """The hit/miss/error counters and the memory tier's size."""
        return {
            "memory_hits": self.memory_hits,
            "disk_hits": self.disk_hits,
            "cache_misses": self.misses,
            "corrupt_entries": self.corrupt_entries,
            "disk_read_errors": self.disk_read_errors,
            "disk_write_errors": self.disk_write_errors,
            "memory_cache_entries": len(self.memory),
            "memory_cache_bytes": self.memory.nbytes,
        }

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _read_disk(self, key: CacheKey, hw: tuple[int, int]) -> CompactEntry | None:
        path = self.path(key)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            # Permission, I/O error, stale NFS handle: the entry may well be good; keep it.
            self._count("disk_read_errors")
            log.warning("segmentation cache: could not read %s (%s); recomputing", path, err)
            return None
        try:
            return decode(data, key.hex, hw)
        except CorruptEntryError as err:
            self._discard_corrupt(path, err)
            return None

    def _discard_corrupt(self, path: Path, err: CorruptEntryError) -> None:
        self._count("corrupt_entries")
        log.warning("segmentation cache: corrupt entry %s (%s); deleting it", path, err)
        try:
            path.unlink(missing_ok=True)  # another reader may have removed it already
        except OSError as unlink_err:
            log.warning("segmentation cache: could not delete %s: %s", path, unlink_err)

    def _label_backend_dir(self, key: CacheKey) -> None:
        """Write ``BACKEND_ID.txt`` once per backend directory, so humans know what it holds."""
        if self.root is None or key.backend_dir in self._labelled:
            return
        label = self.root / FORMAT_DIR / key.backend_dir / BACKEND_LABEL
        if not label.exists():
            run_dir.write_bytes(label, (key.backend_id + "\n").encode())
        self._labelled.add(key.backend_dir)
