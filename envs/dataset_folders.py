"""``images/`` + ``masks/`` folders, matched by file stem."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from envs.dataset_files import (
    IMAGE_EXTENSIONS,
    Entry,
    FileMask,
    Found,
)
from models.errors import UserError


# --------------------------------------------------------------------------------------- folders
def folder_entries(
    found: Found, require_masks: bool, problems: list[tuple[str, str]]
) -> list[Entry]:
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
) -> Entry | None:
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
        return Entry(image.name, label, image, None)
    return Entry(image.name, label, image, FileMask(masks[0]))
