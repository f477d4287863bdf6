"""Load vessel-segmentation datasets in three formats behind one API, and refuse bad data early.

Formats (``load_dataset(path, fmt=...)``):

- ``"sa2va"``: Sa2VA's fine-tuning ``annotations.json``, a JSON list of
  ``{"image": "<file in images/>", "text": [...], "mask": [...]}``. ``mask`` holds flat polygons
  ``[[x1, y1, x2, y2, ...], ...]`` or, as in Sa2VA's own example, one list of polygons per text
  ``[[[x1, y1, ...], ...], ...]``; both nestings (also mixed) are accepted and the ground truth is
  the union of every polygon (:func:`envs.polygons.rasterize_polygons`). An entry without
  ``"mask"`` has no ground truth.
- ``"coco"``: a COCO instance JSON (``DIR/annotations/*.json``, ``DIR/*.json`` or the file's path).
  Ground truth = union of the image's annotations (optionally only those of some category
  names): polygons (rasterised like Sa2VA's), uncompressed and compressed RLE. An image without
  annotations has an empty (all-false) ground truth; a file without an ``"annotations"`` key has
  none. Images are looked up in ``ROOT/images/``, ``ROOT/`` and the JSON's folder, in that order.
- ``"folders"``: ``DIR/images/`` + ``DIR/masks/``, matched by file stem; mask pixels that are
  nonzero (in any colour channel, alpha ignored) are vessel.

``fmt="auto"`` picks, in order of preference, ``annotations.json`` (sa2va, or coco if its content
is a COCO dict), one COCO JSON, then ``images/`` + ``masks/``; when several match, the choice is
recorded in :attr:`Dataset.notes`.

Every image is decoded once inside :func:`load_dataset` (and hashed), so unreadable, truncated,
missing or mismatched files are reported before any long job starts; all problems are collected
and raised as one :class:`~models.errors.UserError`, or with ``skip_bad=True`` listed in
:attr:`Dataset.skipped`. Images are not kept in memory: :meth:`Dataset.load` decodes on demand.
Pixels are read as stored (EXIF orientation is ignored, as in Sa2VA's own PIL loading).

Groups: the split keeps a group (a video) on one side. A group comes from the image id with its
extension removed, through a regex with a named group ``group`` (``re.search``). Ids that do not
match become their own group and are counted in the notes; ``group_pattern=None`` makes every
image its own group.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast

import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm

from envs.polygons import rasterize_polygons
from envs.sample import Sample
from models.errors import UserError

DEFAULT_GROUP_PATTERN = r"^(?P<group>.+)_frame_\d+$"
"""Original naming ``<name>(<id>)_<a>-<b>_<c>_<hash>_frame_<n>.jpg``: the group is the video,
everything before ``_frame_<n>``."""

FORMATS = ("auto", "sa2va", "coco", "folders")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
POLYGON_TOLERANCE_PX = 1.0
"""Polygon points may lie this far outside ``[0, W] x [0, H]`` (annotation tools round)."""
MAX_LISTED_PROBLEMS = 20
PROGRESS_MIN_ITEMS = 200
SKIP_HINT = "Fix them or pass --skip-bad (skip_bad=True) to skip these entries."

# Modes PIL converts to RGB without losing meaning; 16-bit/float greys would need a scaling
# choice we do not want to guess.
_IMAGE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})
_DECODE_THREADS = min(4, os.cpu_count() or 1)
_NUMBER_TYPES = (int, float)


# --------------------------------------------------------------------------- ground-truth sources
Polygon = tuple[str, np.ndarray]
"""A flat polygon with the place it came from (e.g. ``mask[1][0]``), for error messages."""


@dataclass(frozen=True)
class _PolygonMask:
    polygons: list[Polygon]


@dataclass(frozen=True)
class _Rle:
    where: str
    height: int
    width: int
    counts: np.ndarray


@dataclass(frozen=True)
class _CocoMask:
    polygons: list[Polygon]
    rles: list[_Rle]


@dataclass(frozen=True)
class _FileMask:
    path: Path


MaskSource = _PolygonMask | _CocoMask | _FileMask


@dataclass
class _Entry:
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


# --------------------------------------------------------------------------------- the dataset
class Dataset:
    """A validated dataset: ids, groups, and lazy access to images and ground truth.

    Attributes:
        root: dataset folder (for a JSON path: its folder, or the parent of ``annotations/``).
        format: ``"sa2va"``, ``"coco"`` or ``"folders"``.
        ids: image ids, sorted (file names as the annotations give them).
        skipped: ``(entry, reason)`` of entries left out with ``skip_bad=True``.
        notes: facts a user should see (format choice, unmatched group names, ...).
        group_pattern: the regex groups were taken with, ``None`` for one group per image.
    """

    def __init__(
        self,
        root: Path,
        fmt: str,
        entries: Iterable[_Entry],
        groups: dict[str, str],
        skipped: list[tuple[str, str]],
        notes: list[str],
        group_pattern: str | None,
    ) -> None:
        self.root = root
        self.format = fmt
        self._entries = {entry.id: entry for entry in entries}
        self.ids = sorted(self._entries)
        self._groups = groups
        self.skipped = skipped
        self.notes = notes
        self.group_pattern = group_pattern

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._entries

    def group_of(self, image_id: str) -> str:
        """The group (video) of an image."""
        return self._groups[self._entry(image_id).id]

    def groups(self) -> dict[str, list[str]]:
        """Group name -> sorted ids, groups in sorted order."""
        members: dict[str, list[str]] = defaultdict(list)
        for image_id in self.ids:
            members[self._groups[image_id]].append(image_id)
        return dict(sorted(members.items()))

    def has_mask(self, image_id: str) -> bool:
        """Whether the image has ground truth (possibly empty)."""
        return self._entry(image_id).mask is not None

    @property
    def has_masks(self) -> bool:
        """True when every image has ground truth."""
        return all(entry.mask is not None for entry in self._entries.values())

    def image_path(self, image_id: str) -> Path:
        return self._entry(image_id).image_path

    def image_sha256(self, image_id: str) -> str:
        """sha256 of the image file's bytes as validated by :func:`load_dataset`."""
        return self._entry(image_id).image_sha256

    def annotation_sha256(self, image_id: str) -> str | None:
        """sha256 of the image's ground-truth source (mask file bytes or canonical JSON)."""
        return self._entry(image_id).mask_digest

    def load(self, image_id: str) -> Sample:
        """Decode one image (RGB uint8 HxWx3) and rasterise its ground truth (bool HxW or None).

        Raises UserError if the file changed since :func:`load_dataset` validated it.
        """
        entry = self._entry(image_id)
        data = _read_checked(entry.image_path, entry.image_sha256, entry.label)
        image = _decode_rgb(data)
        return Sample(entry.id, self._groups[entry.id], image, _ground_truth(entry))

    def _entry(self, image_id: str) -> _Entry:
        try:
            return self._entries[image_id]
        except KeyError:
            raise KeyError(f"{image_id!r} is not an image of the dataset at {self.root}") from None


def load_dataset(
    path: str | os.PathLike[str],
    *,
    fmt: str = "auto",
    group_pattern: str | None = DEFAULT_GROUP_PATTERN,
    skip_bad: bool = False,
    require_masks: bool = True,
    categories: Sequence[str] | None = None,
) -> Dataset:
    """Find, parse and validate a dataset (every image decoded once), without keeping images.

    Args:
        path: dataset folder, or the annotations JSON file itself.
        fmt: ``"auto"``, ``"sa2va"``, ``"coco"`` or ``"folders"`` (see the module docstring).
        group_pattern: regex with a named group ``group``, searched in each id without its
            extension; ``None`` = one group per image.
        skip_bad: leave bad entries out (listed in :attr:`Dataset.skipped`) instead of raising.
        require_masks: an image without ground truth is a problem; when False it loads with
            ``Sample.mask = None``.
        categories: COCO only: use only annotations of these category names.

    Raises:
        UserError: listing every problem found (or, with ``skip_bad``, dataset-level ones and
            an empty result).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")
    pattern = _compile_group_pattern(group_pattern)
    source = Path(path).expanduser()
    if not source.exists():
        raise UserError(f"dataset path {source} does not exist; pass a dataset folder or JSON")
    found = _resolve_format(source, fmt)
    if categories is not None and found.format != "coco":
        raise UserError(
            f"categories={list(categories)} only apply to COCO data, not {found.format}"
        )
    problems: list[tuple[str, str]] = []
    entries = _parse(found, require_masks, categories, problems)
    entries = _drop_duplicates(entries, problems)
    entries = _validate_files(entries, problems)
    where = f"{found.format} dataset {found.source}"
    problems.sort(key=lambda problem: _natural_key(problem[0]))
    if problems and not skip_bad:
        _raise_problems(where, problems)
    if not entries:
        _raise_empty(where, problems)
    groups, group_notes = _assign_groups([entry.id for entry in entries], pattern, group_pattern)
    notes = found.notes + group_notes + _mask_notes(found.format, entries)
    return Dataset(found.root, found.format, entries, groups, problems, notes, group_pattern)


# ------------------------------------------------------------------------------ format detection
@dataclass
class _Found:
    format: str
    root: Path
    source: Path  # the JSON file, or the folder for "folders"
    document: Any = None  # parsed JSON for sa2va / coco
    notes: list[str] = field(default_factory=list)


def _resolve_format(source: Path, fmt: str) -> _Found:
    if source.is_file():
        return _from_json_file(source, fmt)
    if fmt == "folders":
        return _Found("folders", source, source)
    if fmt == "sa2va":
        annotations = source / "annotations.json"
        if not annotations.is_file():
            raise UserError(f"{source} has no annotations.json; a sa2va dataset needs one")
        return _from_json_file(annotations, "sa2va")
    if fmt == "coco":
        return _from_json_file(_single_coco_json(source), "coco")
    return _detect(source)


def _from_json_file(path: Path, fmt: str) -> _Found:
    document = read_json(path)
    detected = _json_kind(document)
    if fmt == "auto":
        if detected is None:
            raise UserError(
                f"{path} is neither a Sa2VA annotations list nor a COCO dict with 'images'; "
                "check the file or pass --format"
            )
        fmt = detected
    if fmt == "folders":
        raise UserError(f"--format folders needs a folder with images/ and masks/, not {path}")
    root = path.parent.parent if path.parent.name == "annotations" else path.parent
    return _Found(fmt, root, path, document)


def _json_kind(document: Any) -> str | None:
    if isinstance(document, list):
        return "sa2va"
    if isinstance(document, dict) and "images" in document:
        return "coco"
    return None


def _coco_candidates(folder: Path, exclude: Path | None = None) -> list[Path]:
    """JSON files that hold a COCO dict, in ``folder/annotations/`` and ``folder/``."""
    paths = sorted((folder / "annotations").glob("*.json")) + sorted(folder.glob("*.json"))
    found = []
    for path in paths:
        if path == exclude:
            continue  # already parsed by the caller
        try:
            document = json.loads(path.read_bytes())
        except (ValueError, OSError):
            continue  # not ours to judge: only a file chosen as the dataset must parse
        if _json_kind(document) == "coco":
            found.append(path)
    return found


def _single_coco_json(folder: Path) -> Path:
    candidates = _coco_candidates(folder)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UserError(
            f"no COCO JSON (a dict with 'images') in {folder}/annotations/ or {folder}/; "
            "pass the JSON file's path"
        )
    listed = ", ".join(str(path) for path in candidates)
    raise UserError(f"several COCO JSON files in {folder} ({listed}); pass the one to use")


def _detect(folder: Path) -> _Found:
    matches: list[_Found] = []
    if (folder / "annotations.json").is_file():
        matches.append(_from_json_file(folder / "annotations.json", "auto"))
    coco = _coco_candidates(folder, exclude=folder / "annotations.json")
    if len(coco) == 1:
        matches.append(_from_json_file(coco[0], "coco"))
    elif len(coco) > 1 and not matches:
        _single_coco_json(folder)  # raises, naming the candidates
    if (folder / "images").is_dir() and (folder / "masks").is_dir():
        matches.append(_Found("folders", folder, folder))
    if not matches:
        raise UserError(
            f"cannot tell the dataset format of {folder}: expected annotations.json (Sa2VA), "
            "a COCO JSON (annotations/*.json), or images/ + masks/ folders"
        )
    chosen = matches[0]
    if len(matches) > 1:
        others = ", ".join(f"{m.format} ({m.source})" for m in matches[1:])
        chosen.notes.append(
            f"format auto-detected as {chosen.format} ({chosen.source}); also found {others}: "
            "pass --format to use another"
        )
    return chosen


def read_json(path: Path) -> Any:
    """Parse a JSON file; a UserError names the line and column of a syntax error."""
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; "
            f"fix the file (python -m json.tool {path} shows where)"
        ) from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err}); save it as UTF-8 JSON") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err}") from None


# --------------------------------------------------------------------------------------- parsing
def _parse(
    found: _Found,
    require_masks: bool,
    categories: Sequence[str] | None,
    problems: list[tuple[str, str]],
) -> list[_Entry]:
    if found.format == "sa2va":
        return _sa2va_entries(found, require_masks, problems)
    if found.format == "coco":
        return _coco_entries(found, require_masks, categories, problems)
    return _folder_entries(found, require_masks, problems)


def _sa2va_entries(
    found: _Found, require_masks: bool, problems: list[tuple[str, str]]
) -> list[_Entry]:
    document = found.document
    if not isinstance(document, list):
        raise UserError(
            f"{found.source} must hold a JSON list of entries like "
            '{"image": "a.jpg", "text": [...], "mask": [[x1, y1, ...], ...]}, '
            f"not a {type(document).__name__}"
        )
    images = found.source.parent / "images"
    if document and not images.is_dir():
        raise UserError(f"no images/ folder next to {found.source}; put the images there")
    entries = []
    for index, item in enumerate(document):
        entry = _sa2va_entry(index, item, images, require_masks, problems)
        if entry is not None:
            entries.append(entry)
    return entries


def _sa2va_entry(
    index: int, item: Any, images: Path, require_masks: bool, problems: list[tuple[str, str]]
) -> _Entry | None:
    label = f"entry {index}"
    if not isinstance(item, dict):
        problems.append((label, f"is a {type(item).__name__}, expected an object with 'image'"))
        return None
    name = item.get("image")
    if not isinstance(name, str) or not name:
        problems.append((label, "has no 'image' key (the image's file name in images/)"))
        return None
    label = f"entry {index} ({name!r})"
    if "mask" not in item:
        if require_masks:
            problems.append((label, "has no 'mask' (no ground truth); add polygons"))
            return None
        return _Entry(name, label, images / name, None)
    polygons, error = _sa2va_polygons(item["mask"])
    if error is not None:
        problems.append((label, error))
        return None
    digest = _digest_ground_truth(polygons)
    return _Entry(name, label, images / name, _PolygonMask(polygons), digest)


def _sa2va_polygons(value: Any) -> tuple[list[Polygon], str | None]:
    """Flatten Sa2VA's ``mask`` (flat polygons, or a list of polygons per text) to polygons."""
    if not isinstance(value, list):
        return [], "'mask' must be a list of flat polygons [[x1, y1, x2, y2, ...], ...]"
    polygons: list[Polygon] = []
    for i, item in enumerate(value):
        if isinstance(item, list) and item and all(isinstance(v, list) for v in item):
            candidates = [(f"mask[{i}][{j}]", poly) for j, poly in enumerate(item)]
        else:
            candidates = [(f"mask[{i}]", item)]
        for where, poly in candidates:
            if poly == []:
                continue  # an object without polygons adds no pixels
            numbers = _numbers(poly)
            if numbers is None:
                return [], f"{where} must be a flat list of numbers [x1, y1, x2, y2, ...]"
            polygons.append((where, numbers))
    return polygons, None


def _numbers(value: Any) -> np.ndarray | None:
    """A flat list of finite numbers as float64, or None. ``type`` (not isinstance) rejects
    bools; this runs over millions of coordinates, so it stays a single cheap pass."""
    if not isinstance(value, list) or not all(type(v) in _NUMBER_TYPES for v in value):
        return None
    numbers = np.asarray(value, dtype=np.float64)
    return numbers if np.isfinite(numbers).all() else None


def _digest_ground_truth(polygons: list[Polygon], rles: Sequence[_Rle] = ()) -> str:
    """sha256 of parsed ground truth (where each polygon/RLE came from + its numbers)."""
    digest = hashlib.sha256()
    for where, numbers in polygons:
        digest.update(f"{where}:{len(numbers)};".encode())
        digest.update(numbers.tobytes())
    for rle in rles:
        digest.update(f"{rle.where}:{rle.height}x{rle.width}:{len(rle.counts)};".encode())
        digest.update(rle.counts.tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ COCO
def _coco_entries(
    found: _Found,
    require_masks: bool,
    categories: Sequence[str] | None,
    problems: list[tuple[str, str]],
) -> list[_Entry]:
    document = found.document
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise UserError(f"{found.source} is not a COCO instance JSON: it needs an 'images' list")
    annotations = document.get("annotations")
    if annotations is not None and not isinstance(annotations, list):
        raise UserError(f"{found.source}: 'annotations' must be a list")
    wanted = _coco_category_ids(document, categories, found.source)
    images = _coco_images(document["images"], found, problems)
    if annotations is None:
        if require_masks:
            raise UserError(
                f"{found.source} has no 'annotations' (no ground truth); add them, or load "
                "without ground truth (require_masks=False / --allow-unlabelled)"
            )
        return [entry for entry, _ in images.values()]
    return _attach_coco_annotations(images, annotations, wanted, problems)


def _coco_category_ids(
    document: dict, categories: Sequence[str] | None, source: Path
) -> set | None:
    if categories is None:
        return None
    known = {
        c.get("name"): c.get("id") for c in document.get("categories") or [] if isinstance(c, dict)
    }
    missing = [name for name in categories if name not in known]
    if missing:
        raise UserError(
            f"{source} has no categor{'y' if len(missing) == 1 else 'ies'} {missing}; "
            f"known: {sorted(str(name) for name in known)}"
        )
    return {known[name] for name in categories}


def _coco_images(
    records: list, found: _Found, problems: list[tuple[str, str]]
) -> dict[Any, tuple[_Entry, list[tuple[str, Any]]]]:
    """COCO image id -> (entry, its raw segmentations); bad records go to ``problems``."""
    bases = [found.root / "images", found.root, found.source.parent]
    images: dict[Any, tuple[_Entry, list[tuple[str, Any]]]] = {}
    for index, record in enumerate(records):
        name = record.get("file_name") if isinstance(record, dict) else None
        if not isinstance(name, str) or not name or not isinstance(record.get("id"), int | str):
            problems.append((f"images[{index}]", "needs a 'file_name' string and an 'id'"))
            continue
        label = f"image {name!r} (id {record['id']})"
        if record["id"] in images:
            other = images.pop(record["id"])[0]
            problems.append((label, f"has the same COCO id as {other.id!r}; ids must be unique"))
            problems.append((other.label, f"has the same COCO id as {name!r}"))
            continue
        path = next((base / name for base in bases if (base / name).is_file()), bases[0] / name)
        entry = _Entry(name, label, path, None, expected_size=_declared_size(record))
        images[record["id"]] = (entry, [])
    return images


def _declared_size(record: dict) -> tuple[int, int] | None:
    height, width = record.get("height"), record.get("width")
    if isinstance(height, int) and isinstance(width, int):
        return height, width
    return None


def _attach_coco_annotations(
    images: dict[Any, tuple[_Entry, list[tuple[str, Any]]]],
    annotations: list,
    wanted: set | None,
    problems: list[tuple[str, str]],
) -> list[_Entry]:
    for index, ann in enumerate(annotations):
        label = f"annotations[{index}]"
        if not isinstance(ann, dict):
            problems.append((label, "must be an object"))
            continue
        if wanted is not None and ann.get("category_id") not in wanted:
            continue
        label = f"annotation id {ann.get('id')}"
        if ann.get("image_id") not in images:
            problems.append((label, f"refers to image_id {ann.get('image_id')!r}, not in 'images'"))
            continue
        images[ann["image_id"]][1].append((label, ann.get("segmentation")))
    entries = []
    for entry, segmentations in images.values():
        mask = _coco_mask(segmentations)
        if isinstance(mask, str):
            problems.append((entry.label, mask))
            continue
        entry.mask, entry.mask_digest = mask, _digest_ground_truth(mask.polygons, mask.rles)
        entries.append(entry)
    return entries


def _coco_mask(segmentations: list[tuple[str, Any]]) -> _CocoMask | str:
    """The image's polygons and RLEs, or what is wrong with one of its annotations."""
    polygons: list[Polygon] = []
    rles: list[_Rle] = []
    for where, seg in segmentations:
        if isinstance(seg, list) and seg:
            for j, poly in enumerate(seg):
                numbers = _numbers(poly)
                if numbers is None:
                    return f"{where}: segmentation[{j}] must be a flat list of numbers"
                polygons.append((f"{where} segmentation[{j}]", numbers))
        elif isinstance(seg, dict):
            rle = _parse_rle(seg, where)
            if isinstance(rle, str):
                return rle
            rles.append(rle)
        else:
            return f"{where} has no usable 'segmentation' (need polygons or an RLE dict)"
    return _CocoMask(polygons, rles)


def _parse_rle(seg: dict, where: str) -> _Rle | str:
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int for v in size)):
        return f"{where}: RLE needs 'size': [height, width]"
    height, width = size
    if isinstance(counts, str):
        try:
            runs = decode_rle_string(counts)
        except ValueError as err:
            return f"{where}: compressed RLE 'counts' is corrupt ({err})"
    elif isinstance(counts, list) and all(type(v) is int for v in counts):
        runs = counts
    else:
        return f"{where}: RLE 'counts' must be a string or a list of integers"
    if any(run < 0 for run in runs):
        return f"{where}: RLE 'counts' has a negative run length; the RLE is corrupt"
    if sum(runs) != height * width:
        return (
            f"{where}: RLE runs cover {sum(runs)} pixels, but its size {width}x{height} (WxH) "
            f"has {height * width}; the RLE is corrupt or its 'size' is wrong"
        )
    return _Rle(where, height, width, np.asarray(runs, dtype=np.int64))


def decode_rle_string(counts: str) -> list[int]:
    """Run lengths of a COCO compressed RLE string (pycocotools' ``rleFrString``).

    Each run is a signed LEB128-like number in 5-bit chunks offset by ASCII 48; from the third
    run on, the value is a delta to the run two places earlier.
    """
    runs: list[int] = []
    data = counts.encode("ascii", errors="replace")
    p = 0
    while p < len(data):
        value, shift, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("the string ends inside a number")
            chunk = data[p] - 48
            if not 0 <= chunk < 64:
                raise ValueError(f"invalid character {chr(data[p])!r} at position {p}")
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            p, shift = p + 1, shift + 5
            if not more and chunk & 0x10:
                value |= -1 << shift  # sign-extend
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def rle_to_mask(runs: Sequence[int] | np.ndarray, height: int, width: int) -> np.ndarray:
    """Decode COCO run lengths (background first, column-major) to a bool ``(height, width)``."""
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, np.asarray(runs, dtype=np.int64))
    return flat.reshape((height, width), order="F")


# --------------------------------------------------------------------------------------- folders
def _folder_entries(
    found: _Found, require_masks: bool, problems: list[tuple[str, str]]
) -> list[_Entry]:
    images_dir, masks_dir = found.root / "images", found.root / "masks"
    if not images_dir.is_dir():
        raise UserError(f"{found.root} has no images/ folder; the folders format needs one")
    if require_masks and not masks_dir.is_dir():
        raise UserError(f"{found.root} has no masks/ folder (ground truth); add one")
    images, ignored = _image_files(images_dir)
    masks = _image_files(masks_dir)[0] if masks_dir.is_dir() else []
    if ignored:
        found.notes.append(
            f"ignored {len(ignored)} non-image file(s) in images/ (e.g. {ignored[0]})"
        )
    masks_by_stem: dict[str, list[Path]] = defaultdict(list)
    for mask in masks:
        masks_by_stem[mask.stem].append(mask)
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for image in images:
        by_stem[image.stem].append(image)
    entries = [
        entry
        for stem, paths in sorted(by_stem.items())
        if (entry := _folder_entry(stem, paths, masks_by_stem, require_masks, problems))
    ]
    orphans = sorted(set(masks_by_stem) - set(by_stem))
    if orphans:
        found.notes.append(f"ignored {len(orphans)} mask(s) without an image (e.g. {orphans[0]})")
    if any(m.suffix.lower() in {".jpg", ".jpeg"} for m in masks):
        found.notes.append("some masks are JPEG: compression noise counts as vessel; use PNG")
    return entries


def _image_files(folder: Path) -> tuple[list[Path], list[str]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    return images, [p.name for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]


def _folder_entry(
    stem: str,
    paths: list[Path],
    masks_by_stem: dict[str, list[Path]],
    require_masks: bool,
    problems: list[tuple[str, str]],
) -> _Entry | None:
    if len(paths) > 1:
        names = ", ".join(p.name for p in paths)
        problems.append((f"images/{stem}.*", f"duplicate image name: {names} share a stem"))
        return None
    image = paths[0]
    label = f"images/{image.name}"
    masks = masks_by_stem.get(stem, [])
    if len(masks) > 1:
        names = ", ".join(m.name for m in masks)
        problems.append((label, f"several masks match its stem ({names}); keep one"))
        return None
    if not masks:
        if require_masks:
            problems.append((label, f"has no mask masks/{stem}.png; add it"))
            return None
        return _Entry(image.name, label, image, None)
    return _Entry(image.name, label, image, _FileMask(masks[0]))


# ------------------------------------------------------------------------------------ validation
def _drop_duplicates(entries: list[_Entry], problems: list[tuple[str, str]]) -> list[_Entry]:
    by_id: dict[str, list[_Entry]] = defaultdict(list)
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


def _validate_files(entries: list[_Entry], problems: list[tuple[str, str]]) -> list[_Entry]:
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


def _entry_problems(entry: _Entry) -> str | None:
    """Check one entry's files and annotations; fill its size and hashes. None when fine."""
    info = _inspect_image(entry.image_path)
    if isinstance(info, str):
        return info
    entry.height, entry.width, entry.image_sha256 = info
    if entry.expected_size not in (None, (entry.height, entry.width)):
        return _size_mismatch("the annotations declare", entry.expected_size, entry)
    if isinstance(entry.mask, _FileMask):
        return _mask_file_problem(entry, entry.mask.path)
    if isinstance(entry.mask, _PolygonMask | _CocoMask):
        problem = _polygon_problem(entry.mask.polygons, entry.height, entry.width)
        if problem is None and isinstance(entry.mask, _CocoMask):
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


def _size_mismatch(what: str, size: tuple[int, int], entry: _Entry) -> str:
    return (
        f"{what} {size[1]}x{size[0]} (WxH) but image {entry.image_path.name} is "
        f"{entry.width}x{entry.height}; the ground truth must match its image"
    )


def _mask_file_problem(entry: _Entry, path: Path) -> str | None:
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


def _rle_problem(rles: list[_Rle], entry: _Entry) -> str | None:
    for rle in rles:
        if (rle.height, rle.width) != (entry.height, entry.width):
            return _size_mismatch(f"{rle.where}: RLE size is", (rle.height, rle.width), entry)
    return None


# ------------------------------------------------------------------------- decoding ground truth
def _read_checked(path: Path, sha256: str | None, label: str) -> bytes:
    data = _read_bytes(path)
    if isinstance(data, str):
        raise UserError(f"{label}: {data}")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(
            f"{label}: {path} changed since the dataset was checked; load the dataset again"
        )
    return data


def _decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def _decode_mask(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image)
    if pixels.ndim == 3:
        colour = pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., :1]  # drop alpha
        return np.any(colour != 0, axis=2)
    return pixels != 0


def _ground_truth(entry: _Entry) -> np.ndarray | None:
    source = entry.mask
    if source is None:
        return None
    if isinstance(source, _FileMask):
        return _decode_mask(_read_checked(source.path, entry.mask_digest, entry.label))
    flat = cast(list[Sequence[float]], [numbers for _, numbers in source.polygons])
    mask = rasterize_polygons(flat, entry.height, entry.width)
    if isinstance(source, _CocoMask):
        for rle in source.rles:
            mask |= rle_to_mask(rle.counts, rle.height, rle.width)
    return mask


# ---------------------------------------------------------------------------------------- groups
def _compile_group_pattern(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise UserError(f"group pattern {pattern!r} is not a valid regex: {err}") from None
    if "group" not in compiled.groupindex:
        raise UserError(
            f"group pattern {pattern!r} has no named group 'group'; write it like "
            r"'^(?P<group>.+)_frame_\d+$' (the captured text names the video)"
        )
    return compiled


def group_name(image_id: str, pattern: re.Pattern[str] | None) -> str | None:
    """The group captured from an id (extension removed), or None when it does not match."""
    if pattern is None:
        return None
    match = pattern.search(os.path.splitext(image_id)[0])
    return match.group("group") if match and match.group("group") else None


def _assign_groups(
    ids: list[str], pattern: re.Pattern[str] | None, pattern_text: str | None
) -> tuple[dict[str, str], list[str]]:
    groups, unmatched = {}, []
    for image_id in sorted(ids):
        name = group_name(image_id, pattern)
        if name is None and pattern is not None:
            unmatched.append(image_id)
        groups[image_id] = name if name is not None else image_id
    notes = []
    if unmatched:
        notes.append(
            f"{len(unmatched)} of {len(ids)} image name(s) do not match the group pattern "
            f"{pattern_text!r} (e.g. {unmatched[0]!r}); each is its own group. If they are "
            "frames of videos, pass a --group-pattern whose (?P<group>...) captures the video"
        )
    return groups, notes


def _mask_notes(fmt: str, entries: list[_Entry]) -> list[str]:
    without = sum(entry.mask is None for entry in entries)
    notes = [f"{without} of {len(entries)} image(s) have no ground truth"] if without else []
    if fmt == "coco":
        empty = sum(
            isinstance(e.mask, _CocoMask) and not e.mask.polygons and not e.mask.rles
            for e in entries
        )
        if empty:
            notes.append(f"{empty} image(s) have no annotations: their ground truth is empty")
    return notes


# ---------------------------------------------------------------------------------------- errors
def _natural_key(label: str) -> list[int | str]:
    """Sort "entry 2" before "entry 10", so problems read in file order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label)]


def format_problems(problems: Sequence[tuple[str, str]], limit: int = MAX_LISTED_PROBLEMS) -> str:
    """``(entry, reason)`` pairs as indented lines, the first ``limit`` and a count of the rest."""
    lines = [f"  - {entry}: {reason}" for entry, reason in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def _raise_problems(where: str, problems: list[tuple[str, str]]) -> NoReturn:
    raise UserError(
        f"{len(problems)} problem(s) in {where}:\n{format_problems(problems)}\n{SKIP_HINT}"
    )


def _raise_empty(where: str, skipped: list[tuple[str, str]]) -> NoReturn:
    if not skipped:
        raise UserError(f"{where} contains no images; check the path and the annotations")
    raise UserError(
        f"{where}: all {len(skipped)} entries are bad, nothing is left:\n"
        f"{format_problems(skipped)}\nFix the data."
    )
