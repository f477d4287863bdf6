"""The compact form of one cached segmentation, in memory and on disk (format version 2).

A result is stored as a :class:`CompactEntry`: the mask as packed bits and ``prob`` **quantised
to uint8** (:func:`quantise`), about a quarter of float32's bytes. :func:`compact` quantises a
backend's answer and :func:`expand` turns the compact form back into a :class:`Segmentation`
whose ``prob`` is the float32 of each level (``LEVELS``), so a fresh forward pass (the worker
returns ``expand(compact(answer))``), a memory hit and a disk hit hand out bit-identical arrays.

The quantisation keeps the 0.5 threshold exact: ``expand(e).prob > 0.5`` equals the backend's
``prob > 0.5`` pixel for pixel, so ``mask`` keeps its documented relation to ``prob`` (Sa2VA:
equal; Frangi: a subset). Elsewhere a value moves by at most half a level (1/510).

On disk (:func:`encode` / :func:`decode`)::

    MAGIC (8 bytes) | header length (uint32 LE) | header (JSON) | sha256 (32) | deflated payload

The header holds the key, shape, score, flags and whether ``prob`` exists; the payload is the
packed mask bits followed by the quantised ``prob``, deflated (:data:`COMPRESS_LEVEL`; about
1.8x on Frangi's maps, more on Sa2VA's, mostly near 0 or 1); the sha256 covers header and raw
payload.
:func:`decode` raises :class:`CorruptEntryError` for anything that is not a whole entry of
this key and shape, and only then.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from typing import NamedTuple

import numpy as np

from models.segmentation import Segmentation

ENTRY_FORMAT_VERSION = 2
"""Part of every entry's path: two code versions never read or delete each other's entries."""
MAGIC = b"S2VRL\x00\x00\x02"
COMPRESS_LEVEL = 1
"""Deflate level, with the run-length strategy (``Z_RLE``). Measured on Frangi entries of
synthetic 512x512 angiograms: 161 KB per entry (110 entries, benchmarks/bench_cache.py); on one
entry RLE gave 111 KB in 8 ms where the default strategy gave 128 KB in 11 ms, and level 6 saved
6% more for 3.5x the time. float16 + deflate would take ~383 KB, float32 + deflate ~735 KB."""
LEVELS = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
"""The float32 value each uint8 level decodes to (level 127 < 0.5 < level 128)."""
_HEADER_LEN = struct.Struct("<I")


class CorruptEntryError(Exception):
    """Bytes that are not a whole entry of the expected key and shape."""


class CompactEntry(NamedTuple):
    """One result in compact form: what the memory LRU holds and the disk file encodes."""

    shape: tuple[int, int]
    mask_bits: np.ndarray
    """uint8, ``np.packbits`` of the mask (row-major)."""
    prob_levels: np.ndarray | None
    """uint8 HxW quantised ``prob`` (see :func:`quantise`), or ``None``."""
    score: float | None
    flags: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what the memory LRU budgets)."""
        levels = 0 if self.prob_levels is None else int(self.prob_levels.nbytes)
        return int(self.mask_bits.nbytes) + levels


def quantise(prob: np.ndarray) -> np.ndarray:
    """``prob`` in [0, 1] as uint8 levels: the nearest of ``LEVELS``, except that a value above
    0.5 never goes below level 128 and one at or below 0.5 never above level 127."""
    levels = np.clip(np.rint(prob * np.float32(255.0)), 0, 255).astype(np.uint8)
    above = prob > 0.5
    np.maximum(levels, 128, out=levels, where=above)
    np.minimum(levels, 127, out=levels, where=~above)
    return levels


def compact(seg: Segmentation) -> CompactEntry:
    """The compact form of a backend's answer (``prob`` quantised, the mask packed)."""
    mask = np.asarray(seg.mask, dtype=np.bool_)
    levels = None if seg.prob is None else quantise(np.asarray(seg.prob, dtype=np.float32))
    score = None if seg.score is None else float(seg.score)
    shape = (int(mask.shape[0]), int(mask.shape[1]))
    flags = tuple(str(f) for f in seg.flags)
    return CompactEntry(shape, np.packbits(mask.ravel()), levels, score, flags)


def expand(entry: CompactEntry) -> Segmentation:
    """The segmentation an entry stands for: fresh read-only arrays, equal for equal entries."""
    n = entry.shape[0] * entry.shape[1]
    mask = np.unpackbits(entry.mask_bits, count=n).view(np.bool_).reshape(entry.shape)
    mask.setflags(write=False)
    prob = None
    if entry.prob_levels is not None:
        prob = LEVELS[entry.prob_levels]
        prob.setflags(write=False)
    return Segmentation(mask=mask, prob=prob, score=entry.score, flags=entry.flags)


def encode(key: str, entry: CompactEntry) -> bytes:
    """The bytes of one disk entry of ``key`` (see the module docstring)."""
    header = json.dumps(
        {
            "key": key,
            "shape": list(entry.shape),
            "score": entry.score,
            "flags": list(entry.flags),
            "prob": entry.prob_levels is not None,
        }
    ).encode()
    payload = entry.mask_bits.tobytes()
    if entry.prob_levels is not None:
        payload += entry.prob_levels.tobytes()
    digest = hashlib.sha256(header + payload).digest()
    deflate = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    compressed = deflate.compress(payload) + deflate.flush()
    return MAGIC + _HEADER_LEN.pack(len(header)) + header + digest + compressed


def decode(data: bytes, key: str, hw: tuple[int, int]) -> CompactEntry:
    """Check and decode one disk entry; raises :class:`CorruptEntryError` saying what is wrong."""
    start = len(MAGIC) + _HEADER_LEN.size
    if len(data) < start or data[: len(MAGIC)] != MAGIC:
        raise CorruptEntryError("not a format-2 entry")
    (header_len,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
    header_bytes = data[start : start + header_len]
    digest = data[start + header_len : start + header_len + 32]
    try:
        header = json.loads(header_bytes)
        payload = zlib.decompress(data[start + header_len + 32 :])
    except (ValueError, zlib.error) as err:
        raise CorruptEntryError(f"unreadable: {err}") from err
    if hashlib.sha256(header_bytes + payload).digest() != digest:
        raise CorruptEntryError("checksum mismatch")
    if header.get("key") != key:
        raise CorruptEntryError("entry holds another key")
    if tuple(header["shape"]) != tuple(hw):
        raise CorruptEntryError(f"shape {tuple(header['shape'])} but the image is {tuple(hw)}")
    n_bits = (hw[0] * hw[1] + 7) // 8
    n_levels = hw[0] * hw[1] if header["prob"] else 0
    if len(payload) != n_bits + n_levels:
        raise CorruptEntryError("inconsistent sizes")
    raw = np.frombuffer(payload, dtype=np.uint8)
    levels = raw[n_bits:].reshape(hw) if header["prob"] else None
    score = None if header["score"] is None else float(header["score"])
    return CompactEntry(
        (int(hw[0]), int(hw[1])), raw[:n_bits], levels, score, tuple(header["flags"])
    )
