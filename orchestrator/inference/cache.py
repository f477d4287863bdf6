"""Content-addressed cache of segmentation results: a bounded memory LRU over a disk store.

A result is addressed by ``CacheKey(backend_id, image_digest(image), prompt)``, whose ``hex`` is
sha256 over the backend id, the image's sha256 (bytes + shape + dtype) and the prompt text.
Equal keys give equal results; any change of backend, pixels or prompt gives another key, so a
stale answer is never served.

Disk layout (the directory outlives runs and is shared by every worker, trial and run)::

    <cache_dir>/<sha256(backend_id)[:16]>/BACKEND_ID.txt        the backend id, for humans
    <cache_dir>/<sha256(backend_id)[:16]>/<key[:2]>/<key>.npz   one result

Each ``.npz`` holds the mask as packed bits, ``prob`` as **float32** (lossless: a memory hit, a
disk hit and a fresh forward pass return bit-identical arrays, equal to what the backend itself
returned, so no result depends on how warm the cache was; float16 would halve the disk use but
make a disk hit differ from the computed answer), the score, the flags and a sha256 checksum
over all of them plus the key. Entries are not deflated: the noisy low mantissa bits of float32
probabilities leave ~12% to gain, for ~30 ms more per write and ~4 ms more per read of a 512x512
entry (about 1.06 MB on disk). Files are written with :func:`orchestrator.run_dir.write_bytes`
(a unique temp file, fsync, ``os.replace``), so concurrent writers (also on NFS-like storage)
and crashes leave either the old or the new complete file. A torn or corrupt entry (bad zip,
checksum mismatch, wrong key or shape) is logged, counted, deleted and reported as a miss,
never returned.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from models.segmentation import Segmentation
from orchestrator import run_dir

log = logging.getLogger(__name__)

ENTRY_FORMAT_VERSION = 1
DEFAULT_MEMORY_BYTES = 512 * 2**20


class CacheHit(NamedTuple):
    """A cached result and where it came from (``"memory"`` or ``"disk"``)."""

    segmentation: Segmentation
    tier: str


class CorruptEntryError(Exception):
    """A disk entry that must not be returned (raised and handled inside this module)."""


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
        return hashlib.sha256(self.backend_id.encode()).hexdigest()[:16]


def canonical(seg: Segmentation) -> Segmentation:
    """The form the cache stores and returns: contiguous read-only arrays, a Python float score and
    a tuple of str flags, so every tier hands out identical values and nobody can mutate them."""
    mask = np.array(seg.mask, dtype=np.bool_, order="C")
    mask.setflags(write=False)
    prob = None
    if seg.prob is not None:
        prob = np.array(seg.prob, dtype=np.float32, order="C")
        prob.setflags(write=False)
    score = None if seg.score is None else float(seg.score)
    return Segmentation(mask=mask, prob=prob, score=score, flags=tuple(str(f) for f in seg.flags))


def segmentation_nbytes(seg: Segmentation) -> int:
    """Bytes the arrays of ``seg`` occupy (what the memory LRU budgets)."""
    return int(seg.mask.nbytes) + (0 if seg.prob is None else int(seg.prob.nbytes))


class MemoryLRU:
    """A thread-safe LRU of segmentations bounded by the bytes of their arrays."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, Segmentation] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Segmentation | None:
        with self._lock:
            seg = self._items.get(key)
            if seg is not None:
                self._items.move_to_end(key)
            return seg

    def put(self, key: str, seg: Segmentation) -> None:
        size = segmentation_nbytes(seg)
        if size > self.max_bytes:
            return  # would evict everything else and still not fit
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= segmentation_nbytes(old)
            self._items[key] = seg
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= segmentation_nbytes(evicted)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


def _checksum(
    key: str,
    shape: np.ndarray,
    bits: np.ndarray,
    prob: np.ndarray | None,
    score: np.ndarray,
    flags: str,
) -> str:
    digest = hashlib.sha256(f"v{ENTRY_FORMAT_VERSION}|{key}|{flags}|".encode())
    # Hash the arrays' buffers in place: copying 1 MB of prob per read would double its cost.
    for part in (_le(shape, "<i8"), _le(bits, "u1"), _le(score, "<f8")):
        digest.update(part.data)
    digest.update(b"prob:")
    digest.update(b"none" if prob is None else _le(prob, "<f4").data)
    return digest.hexdigest()


def _le(array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` as a contiguous array of ``dtype`` (no copy when it already is one)."""
    return np.ascontiguousarray(array, dtype=dtype)


def encode_entry(key: str, seg: Segmentation) -> dict[str, np.ndarray]:
    """The arrays of one disk entry (see the module docstring)."""
    shape = np.array(seg.mask.shape, dtype="<i8")
    bits = np.packbits(seg.mask.ravel())
    score = np.array([] if seg.score is None else [seg.score], dtype="<f8")
    flags = json.dumps(list(seg.flags))
    prob = None if seg.prob is None else seg.prob.astype("<f4")
    arrays = {
        "version": np.array(ENTRY_FORMAT_VERSION),
        "key": np.array(key),
        "shape": shape,
        "mask_bits": bits,
        "score": score,
        "flags": np.array(flags),
        "checksum": np.array(_checksum(key, shape, bits, prob, score, flags)),
    }
    if prob is not None:
        arrays["prob"] = prob
    return arrays


def decode_entry(arrays: dict[str, np.ndarray], key: str, hw: tuple[int, int]) -> Segmentation:
    """Check and decode one disk entry; raises :class:`CorruptEntryError` saying what is wrong."""
    if int(arrays["version"]) != ENTRY_FORMAT_VERSION:
        raise CorruptEntryError(f"format version {int(arrays['version'])}")
    if str(arrays["key"]) != key:
        raise CorruptEntryError("entry holds another key")
    shape, bits, score = arrays["shape"], arrays["mask_bits"], arrays["score"]
    if tuple(int(s) for s in shape) != tuple(hw):
        raise CorruptEntryError(f"shape {tuple(shape)} but the image is {tuple(hw)}")
    prob = arrays.get("prob")
    flags = str(arrays["flags"])
    if str(arrays["checksum"]) != _checksum(key, shape, bits, prob, score, flags):
        raise CorruptEntryError("checksum mismatch")
    n = hw[0] * hw[1]
    if bits.size != (n + 7) // 8 or score.size > 1:
        raise CorruptEntryError("inconsistent sizes")
    # Fresh arrays from the file: made read-only in place instead of copied by canonical().
    mask = np.unpackbits(bits, count=n).view(np.bool_).reshape(hw)
    mask.setflags(write=False)
    if prob is not None:
        prob = _le(prob, "<f4").reshape(hw)
        prob.setflags(write=False)
    return Segmentation(
        mask=mask,
        prob=prob,
        score=float(score[0]) if score.size else None,
        flags=tuple(str(f) for f in json.loads(flags)),
    )


# What a torn, truncated or overwritten .npz can raise while being opened and read.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


class InferenceCache:
    """A memory LRU (bytes-bounded) in front of an optional disk store, for any backend ids.

    Thread-safe. ``get`` returns a :class:`CacheHit` or ``None``; ``put`` stores a result in
    both tiers and returns its canonical form (return that to callers, so a miss and a later hit
    give identical values). Counters: ``memory_hits`` and ``disk_hits`` (counted by ``get``),
    ``misses`` (counted by ``put``: a lookup that finds nothing is not yet a miss, the caller may
    look again after waiting for a lock), ``corrupt_entries``, ``disk_write_errors``.
    """

    def __init__(
        self, cache_dir: str | os.PathLike[str] | None, memory_bytes: int = DEFAULT_MEMORY_BYTES
    ) -> None:
        self.root = None if cache_dir is None else Path(cache_dir)
        self.memory = MemoryLRU(memory_bytes)
        self.memory_hits = self.disk_hits = self.misses = 0
        self.corrupt_entries = self.disk_write_errors = 0
        self._labelled: set[str] = set()
        self._lock = threading.Lock()

    def path(self, key: CacheKey) -> Path | None:
        """Where the entry of ``key`` lives on disk (``None`` without a cache dir)."""
        if self.root is None:
            return None
        digest = key.hex
        return self.root / key.backend_dir / digest[:2] / f"{digest}.npz"

    def get(self, key: CacheKey, hw: tuple[int, int]) -> CacheHit | None:
        """The cached result of ``key`` for an image of height/width ``hw``, or ``None``."""
        seg = self.memory.get(key.hex)
        if seg is not None and seg.mask.shape == tuple(hw):
            self._count("memory_hits")
            return CacheHit(seg, "memory")
        seg = self._read_disk(key, hw)
        if seg is None:
            return None
        self.memory.put(key.hex, seg)
        self._count("disk_hits")
        return CacheHit(seg, "disk")

    def put(self, key: CacheKey, seg: Segmentation) -> Segmentation:
        """Store ``seg`` under ``key`` in memory and on disk; returns the canonical form."""
        seg = canonical(seg)
        self._count("misses")
        self.memory.put(key.hex, seg)
        path = self.path(key)
        if path is not None:
            try:
                self._label_backend_dir(key)
                _atomic_write_npz(path, encode_entry(key.hex, seg))
            except OSError as err:
                # A full or read-only disk costs future recomputation, not this answer.
                self._count("disk_write_errors")
                log.warning("segmentation cache: could not write %s: %s", path, err)
        return seg

    def counters(self) -> dict[str, int]:
        """The hit/miss/corruption counters and the memory tier's size."""
        return {
            "memory_hits": self.memory_hits,
            "disk_hits": self.disk_hits,
            "cache_misses": self.misses,
            "corrupt_entries": self.corrupt_entries,
            "disk_write_errors": self.disk_write_errors,
            "memory_cache_entries": len(self.memory),
            "memory_cache_bytes": self.memory.nbytes,
        }

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _read_disk(self, key: CacheKey, hw: tuple[int, int]) -> Segmentation | None:
        path = self.path(key)
        if path is None:
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
            return decode_entry(arrays, key.hex, hw)
        except FileNotFoundError:
            return None
        except (CorruptEntryError, *_READ_ERRORS) as err:
            self._discard_corrupt(path, err)
            return None

    def _discard_corrupt(self, path: Path, err: BaseException) -> None:
        self._count("corrupt_entries")
        log.warning(
            "segmentation cache: corrupt entry %s (%s: %s); deleted, will recompute",
            path,
            type(err).__name__,
            err,
        )
        path.unlink(missing_ok=True)  # another reader may have removed it already

    def _label_backend_dir(self, key: CacheKey) -> None:
        """Write ``BACKEND_ID.txt`` once per backend directory, so humans know what it holds."""
        if self.root is None or key.backend_dir in self._labelled:
            return
        label = self.root / key.backend_dir / "BACKEND_ID.txt"
        if not label.exists():
            run_dir.write_bytes(label, (key.backend_id + "\n").encode())
        self._labelled.add(key.backend_dir)


def _atomic_write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    run_dir.write_bytes(path, buffer.getvalue())
