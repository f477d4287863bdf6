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

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from envs.dataset_coco import coco_entries
from envs.dataset_files import (
    CocoMask,
    Entry,
    Found,
    decode_rgb,
    drop_duplicates,
    ground_truth,
    read_checked,
    validate_files,
)
from envs.dataset_folders import folder_entries
from envs.dataset_sa2va import sa2va_entries
from envs.sample import Sample
from models.errors import UserError, option

DEFAULT_GROUP_PATTERN = r"^(?P<group>.+)_frame_\d+$"
"""Original naming ``<name>(<id>)_<a>-<b>_<c>_<hash>_frame_<n>.jpg``: the group is the video,
everything before ``_frame_<n>``."""

FORMATS = ("auto", "sa2va", "coco", "folders")
"""Polygon points may lie this far outside ``[0, W] x [0, H]`` (annotation tools round)."""
MAX_LISTED_PROBLEMS = 20
SKIP_HINT = f"Fix them or pass {option('skip_bad')} to skip these entries."

# Modes PIL converts to RGB without losing meaning; 16-bit/float greys would need a scaling
# choice we do not want to guess.


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
        entries: Iterable[Entry],
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
        data = read_checked(entry.image_path, entry.image_sha256, entry.label)
        image = decode_rgb(data)
        return Sample(entry.id, self._groups[entry.id], image, ground_truth(entry))

    def _entry(self, image_id: str) -> Entry:
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
    entries = drop_duplicates(entries, problems)
    entries = validate_files(entries, problems)
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
def _resolve_format(source: Path, fmt: str) -> Found:
    if source.is_file():
        return _from_json_file(source, fmt)
    if fmt == "folders":
        return Found("folders", source, source)
    if fmt == "sa2va":
        annotations = source / "annotations.json"
        if not annotations.is_file():
            raise UserError(f"{source} has no annotations.json; a sa2va dataset needs one")
        return _from_json_file(annotations, "sa2va")
    if fmt == "coco":
        return _from_json_file(_single_coco_json(source), "coco")
    return _detect(source)


def _from_json_file(path: Path, fmt: str) -> Found:
    document = read_json(path)
    detected = _json_kind(document)
    if fmt == "auto":
        if detected is None:
            raise UserError(
                f"{path} is neither a Sa2VA annotations list nor a COCO dict with 'images'; "
                f"check the file or pass {option('format')}"
            )
        fmt = detected
    if fmt == "folders":
        raise UserError(
            f"{option('format')} folders needs a folder with images/ and masks/, not {path}"
        )
    root = path.parent.parent if path.parent.name == "annotations" else path.parent
    return Found(fmt, root, path, document)


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


def _detect(folder: Path) -> Found:
    matches: list[Found] = []
    if (folder / "annotations.json").is_file():
        matches.append(_from_json_file(folder / "annotations.json", "auto"))
    coco = _coco_candidates(folder, exclude=folder / "annotations.json")
    if len(coco) == 1:
        matches.append(_from_json_file(coco[0], "coco"))
    elif len(coco) > 1 and not matches:
        _single_coco_json(folder)  # raises, naming the candidates
    if (folder / "images").is_dir() and (folder / "masks").is_dir():
        matches.append(Found("folders", folder, folder))
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
    found: Found,
    require_masks: bool,
    categories: Sequence[str] | None,
    problems: list[tuple[str, str]],
) -> list[Entry]:
    if found.format == "sa2va":
        return sa2va_entries(found, require_masks, problems)
    if found.format == "coco":
        return coco_entries(found, require_masks, categories, problems)
    return folder_entries(found, require_masks, problems)


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


def _mask_notes(fmt: str, entries: list[Entry]) -> list[str]:
    without = sum(entry.mask is None for entry in entries)
    notes = [f"{without} of {len(entries)} image(s) have no ground truth"] if without else []
    if fmt == "coco":
        empty = sum(
            isinstance(e.mask, CocoMask) and not e.mask.polygons and not e.mask.rles
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
