"""COCO instance JSON: images, their annotations (polygons, RLE) and categories."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from envs.dataset_files import (
    CocoMask,
    Entry,
    Found,
    Polygon,
    Rle,
    digest_ground_truth,
    flat_numbers,
)
from models.errors import UserError


# ------------------------------------------------------------------------------------------ COCO
def coco_entries(
    found: Found,
    require_masks: bool,
    categories: Sequence[str] | None,
    problems: list[tuple[str, str]],
) -> list[Entry]:
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
    records: list, found: Found, problems: list[tuple[str, str]]
) -> dict[Any, tuple[Entry, list[tuple[str, Any]]]]:
    """COCO image id -> (entry, its raw segmentations); bad records go to ``problems``."""
    bases = [found.root / "images", found.root, found.source.parent]
    images: dict[Any, tuple[Entry, list[tuple[str, Any]]]] = {}
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
        entry = Entry(name, label, path, None, expected_size=_declared_size(record))
        images[record["id"]] = (entry, [])
    return images


def _declared_size(record: dict) -> tuple[int, int] | None:
    height, width = record.get("height"), record.get("width")
    if isinstance(height, int) and isinstance(width, int):
        return height, width
    return None


def _attach_coco_annotations(
    images: dict[Any, tuple[Entry, list[tuple[str, Any]]]],
    annotations: list,
    wanted: set | None,
    problems: list[tuple[str, str]],
) -> list[Entry]:
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
        entry.mask, entry.mask_digest = mask, digest_ground_truth(mask.polygons, mask.rles)
        entries.append(entry)
    return entries


def _coco_mask(segmentations: list[tuple[str, Any]]) -> CocoMask | str:
    """The image's polygons and RLEs, or what is wrong with one of its annotations."""
    polygons: list[Polygon] = []
    rles: list[Rle] = []
    for where, seg in segmentations:
        if isinstance(seg, list) and seg:
            for j, poly in enumerate(seg):
                numbers = flat_numbers(poly)
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
    return CocoMask(polygons, rles)


def _parse_rle(seg: dict, where: str) -> Rle | str:
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
    return Rle(where, height, width, np.asarray(runs, dtype=np.int64))


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
