"""What every dataset format parses into, and the checks and decoding they share.

A format module (:mod:`envs.dataset_sa2va`, :mod:`envs.dataset_coco`,
:mod:`envs.dataset_folders`) turns its annotations into :class:`Entry` objects;
:func:`validate_files` decodes and hashes every image once (in threads, with a progress bar on
large sets) and checks masks and polygons against it; :func:`ground_truth` rasterises an
entry's mask source when :meth:`envs.datasets.Dataset.load` needs it.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm

from envs.polygons import rasterize_polygons
from models.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
POLYGON_TOLERANCE_PX = 1.0
PROGRESS_MIN_ITEMS = 200
_IMAGE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})
_DECODE_THREADS = min(4, os.cpu_count() or 1)
NUMBER_TYPES = (int, float)


# --------------------------------------------------------------------------- ground-truth sources
Polygon = tuple[str, np.ndarray]
"""A flat polygon with the place it came from (e.g. ``mask[1][0]``), for error messages."""


@dataclass(frozen=True)
class PolygonMask:
    polygons: list[Polygon]


@dataclass(frozen=True)
class Rle:
    where: str
    height: int
    width: int
    counts: np.ndarray


@dataclass(frozen=True)
class CocoMask:
    polygons: list[Polygon]
    rles: list[Rle]


@dataclass(frozen=True)
class FileMask:
    path: Path


MaskSource = PolygonMask | CocoMask | FileMask


@dataclass
class Entry:
    """One image as parsed from the annotations; ``height``/``width``/hashes set by validation."""

    id: str
    label: str  # how messages name the entry, e.g. "entry 3 ('a.jpg')"
    image_path: Path
    mask: MaskSource | None
    mask_digest: str | None = None  # sha256 of the ground-truth source, None without one
    height: int = 0
    width: int = 0
    image_sha256: str = ""
    expected_size: tuple[int, int] | None = None  # (height, width) declared by the annotations


@dataclass
class Found:
    format: str
    root: Path
    source: Path  # the JSON file, or the folder for "folders"
    document: Any = None  # parsed JSON for sa2va / coco
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ validation
def drop_duplicates(entries: list[Entry], problems: list[tuple[str, str]]) -> list[Entry]:
    by_id: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        by_id[entry.id].append(entry)
    kept = []
    for image_id, same in by_id.items():
        if len(same) == 1:
            kept.append(same[0])
            continue
        for entry in same:
            others = ", ".join(other.label for other in same if other is not entry)
            reason = f"duplicate image name {image_id!r}, also in {others}; keep one entry"
            problems.append((entry.label, reason))
    return kept


def validate_files(entries: list[Entry], problems: list[tuple[str, str]]) -> list[Entry]:
    """Decode every image (and mask file) once, in threads (PIL releases the GIL)."""
    with (
        ThreadPoolExecutor(_DECODE_THREADS) as pool,
        tqdm(
            total=len(entries),
            desc="checking images",
            unit="img",
            file=sys.stderr,
            disable=len(entries) <= PROGRESS_MIN_ITEMS,
        ) as progress,
    ):
        reasons = []
        for result in pool.map(_entry_problems, entries):
            reasons.append(result)
            progress.update()
    kept = []
    for entry, reason in zip(entries, reasons, strict=True):
        if reason is None:
            kept.append(entry)
        else:
            problems.append((entry.label, reason))
    return kept


def _entry_problems(entry: Entry) -> str | None:
    """Check one entry's files and annotations; fill its size and hashes. None when fine."""
    info = _inspect_image(entry.image_path)
    if isinstance(info, str):
        return info
    entry.height, entry.width, entry.image_sha256 = info
    if entry.expected_size not in (None, (entry.height, entry.width)):
        return _size_mismatch("the annotations declare", entry.expected_size, entry)
    if isinstance(entry.mask, FileMask):
        return _mask_file_problem(entry, entry.mask.path)
    if isinstance(entry.mask, PolygonMask | CocoMask):
        problem = _polygon_problem(entry.mask.polygons, entry.height, entry.width)
        if problem is None and isinstance(entry.mask, CocoMask):
            problem = _rle_problem(entry.mask.rles, entry)
        return problem
    return None


def _inspect_image(path: Path) -> tuple[int, int, str] | str:
    """(height, width, sha256) of a decodable image, or what is wrong with it."""
    data = _read_bytes(path)
    if isinstance(data, str):
        return data
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode, (width, height), kind = image.mode, image.size, image.format
    # Decoders of damaged files raise many exception types (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError...); all mean "this file cannot be used".
    except Exception as err:
        return f"cannot decode image {path} ({err}): unreadable or truncated; replace the file"
    if kind == "JPEG" and ImageFile.LOAD_TRUNCATED_IMAGES and not _has_jpeg_end(data):
        # Someone enabled PIL's truncated-image tolerance, so load() no longer raises.
        return f"image {path} is truncated (no JPEG end-of-image marker); replace the file"
    if mode not in _IMAGE_MODES:
        return f"image {path} has pixel mode {mode} (e.g. 16-bit); convert it to 8-bit"
    return height, width, hashlib.sha256(data).hexdigest()


def _has_jpeg_end(data: bytes) -> bool:
    # EOI (FF D9) ends a JPEG; allow some trailing bytes some writers append.
    return b"\xff\xd9" in data[-1024:]


def _read_bytes(path: Path) -> bytes | str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"image file not found: {path}"
    except OSError as err:
        return f"cannot read {path}: {err}"
    return data if data else f"file {path} is empty (0 bytes); replace it"


def _size_mismatch(what: str, size: tuple[int, int], entry: Entry) -> str:
    return (
        f"{what} {size[1]}x{size[0]} (WxH) but image {entry.image_path.name} is "
        f"{entry.width}x{entry.height}; the ground truth must match its image"
    )


def _mask_file_problem(entry: Entry, path: Path) -> str | None:
    data = _read_bytes(path)
    if isinstance(data, str):
        return data.replace("image file", "mask file")
    try:
        mask = _decode_mask(data)
    except Exception as err:  # same zoo of decoder errors as in _inspect_image
        return f"cannot decode mask {path} ({err}): unreadable or truncated; replace the file"
    if mask.shape != (entry.height, entry.width):
        return _size_mismatch(f"mask {path.name} is", mask.shape, entry)
    entry.mask_digest = hashlib.sha256(data).hexdigest()
    return None


def _polygon_problem(polygons: list[Polygon], height: int, width: int) -> str | None:
    for where, numbers in polygons:
        if len(numbers) % 2:
            return f"{where} has an odd number of values ({len(numbers)}): need x, y pairs"
        points = np.asarray(numbers).reshape(-1, 2)
        if len(points) < 3:
            return f"{where} has {len(points)} point(s); a polygon needs at least 3"
        limit = np.array([width, height]) + POLYGON_TOLERANCE_PX
        outside = np.any((points < -POLYGON_TOLERANCE_PX) | (points > limit), axis=1)
        if outside.any():
            x, y = points[np.argmax(outside)]
            return (
                f"{where} has point ({x:g}, {y:g}) outside the {width}x{height} image (x in "
                f"[0, {width}], y in [0, {height}]); are the coordinates for a resized copy?"
            )
    return None


def _rle_problem(rles: list[Rle], entry: Entry) -> str | None:
    for rle in rles:
        if (rle.height, rle.width) != (entry.height, entry.width):
            return _size_mismatch(f"{rle.where}: RLE size is", (rle.height, rle.width), entry)
    return None


# ------------------------------------------------------------------------- decoding ground truth
def read_checked(path: Path, sha256: str | None, label: str) -> bytes:
    data = _read_bytes(path)
    if isinstance(data, str):
        raise UserError(f"{label}: {data}")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(
            f"{label}: {path} changed since the dataset was checked; load the dataset again"
        )
    return data


def decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def _decode_mask(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image)
    if pixels.ndim == 3:
        colour = pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., :1]  # drop alpha
        return np.any(colour != 0, axis=2)
    return pixels != 0


def ground_truth(entry: Entry) -> np.ndarray | None:
    source = entry.mask
    if source is None:
        return None
    if isinstance(source, FileMask):
        return _decode_mask(read_checked(source.path, entry.mask_digest, entry.label))
    flat = cast(list[Sequence[float]], [numbers for _, numbers in source.polygons])
    mask = rasterize_polygons(flat, entry.height, entry.width)
    if isinstance(source, CocoMask):
        for rle in source.rles:
            mask |= rle_to_mask(rle.counts, rle.height, rle.width)
    return mask


def flat_numbers(value: Any) -> np.ndarray | None:
    """A flat list of finite numbers as float64, or None. ``type`` (not isinstance) rejects
    bools; this runs over millions of coordinates, so it stays a single cheap pass."""
    if not isinstance(value, list) or not all(type(v) in NUMBER_TYPES for v in value):
        return None
    numbers = np.asarray(value, dtype=np.float64)
    return numbers if np.isfinite(numbers).all() else None


def digest_ground_truth(polygons: list[Polygon], rles: Sequence[Rle] = ()) -> str:
    """sha256 of parsed ground truth (where each polygon/RLE came from + its numbers)."""
    digest = hashlib.sha256()
    for where, numbers in polygons:
        digest.update(f"{where}:{len(numbers)};".encode())
        digest.update(numbers.tobytes())
    for rle in rles:
        digest.update(f"{rle.where}:{rle.height}x{rle.width}:{len(rle.counts)};".encode())
        digest.update(rle.counts.tobytes())
    return digest.hexdigest()


def rle_to_mask(runs: Sequence[int] | np.ndarray, height: int, width: int) -> np.ndarray:
    """Decode COCO run lengths (background first, column-major) to a bool ``(height, width)``."""
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, np.asarray(runs, dtype=np.int64))
    return flat.reshape((height, width), order="F")
