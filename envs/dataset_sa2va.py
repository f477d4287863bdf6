"""Sa2VA's fine-tuning ``annotations.json``: a list of ``{"image", "text", "mask"}`` entries
with polygon masks (see :mod:`envs.datasets`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from envs.dataset_files import (
    Entry,
    Found,
    Polygon,
    PolygonMask,
    digest_ground_truth,
    flat_numbers,
)
from models.errors import UserError


def sa2va_entries(
    found: Found, require_masks: bool, problems: list[tuple[str, str]]
) -> list[Entry]:
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
) -> Entry | None:
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
        return Entry(name, label, images / name, None)
    polygons, error = _sa2va_polygons(item["mask"])
    if error is not None:
        problems.append((label, error))
        return None
    digest = digest_ground_truth(polygons)
    return Entry(name, label, images / name, PolygonMask(polygons), digest)


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
            numbers = flat_numbers(poly)
            if numbers is None:
                return [], f"{where} must be a flat list of numbers [x1, y1, x2, y2, ...]"
            polygons.append((where, numbers))
    return polygons, None
