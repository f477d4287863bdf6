"""Split a dataset into train / val / test by group (video), and record the split in a manifest.

Frames of one video are near-duplicates, so whole groups go to one side. The manifest written
next to a run pins the split (ids, groups, seed, fractions, pattern) and the content of every
image and its ground truth (sha256), so a checkpoint can name the exact split it was trained on
(``manifest_hash``) and a later run can refuse a dataset that changed since.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from envs.datasets import Dataset, format_problems, read_json
from models.errors import UserError, option

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
SPLIT_NAMES = ("train", "val", "test")
MANIFEST_VERSION = 1


class Split(NamedTuple):
    """Image ids per split, each list sorted."""

    train: list[str]
    val: list[str]
    test: list[str]


def split_dataset(
    dataset: Dataset, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> Split:
    """Split a dataset's images by group; see :func:`split_groups`."""
    return split_groups(dataset.groups(), fractions, seed)


def split_groups(
    groups: Mapping[str, Sequence[str]],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> Split:
    """Assign whole groups (name -> ids) to train / val / test so image counts come close to
    ``fractions``.

    Group names are sorted, then shuffled with ``numpy.random.default_rng(seed)``; each group
    goes to the split furthest below its target image count, and the last groups fill any split
    with a non-zero fraction that is still empty. Same groups + seed -> same split.

    Raises:
        UserError: bad fractions, or fewer groups than splits with a non-zero fraction.
    """
    targets = _check_fractions(fractions)
    wanted = [i for i, fraction in enumerate(targets) if fraction > 0]
    if len(groups) < len(wanted):
        raise UserError(
            f"the dataset has {len(groups)} group(s) but {len(wanted)} splits need images "
            f"(fractions {tuple(fractions)}); every group goes to one split, so add data, "
            f"set a fraction to 0, or use a {option('group_pattern')} that finds more groups"
        )
    names = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    total = sum(len(ids) for ids in groups.values())
    counts = [0, 0, 0]
    members: list[list[str]] = [[], [], []]
    for position, index in enumerate(order):
        ids = groups[names[index]]
        empty = [i for i in wanted if not members[i]]
        if empty and len(order) - position <= len(empty):
            choice = empty[0]  # the remaining groups must go to the splits still empty
        else:
            choice = max(wanted, key=lambda i: targets[i] * total - counts[i])
        members[choice].extend(ids)
        counts[choice] += len(ids)
    return Split(*(sorted(ids) for ids in members))


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values):
        raise UserError(
            f"split fractions {tuple(fractions)} must be three numbers >= 0 (train, val, test)"
        )
    if abs(sum(values) - 1.0) > 1e-6:
        raise UserError(f"split fractions {values} sum to {sum(values):g}; they must sum to 1")
    return values[0], values[1], values[2]


# -------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Manifest:
    """A recorded split: what :func:`write_manifest` wrote and :func:`read_manifest` checked.

    ``manifest_hash`` is the sha256 of the canonical content without the dataset root, so a
    dataset moved to another folder keeps its hash.
    """

    root: str
    format: str
    seed: int
    fractions: tuple[float, float, float]
    group_pattern: str | None
    split: Split
    groups: dict[str, str]
    image_sha256: dict[str, str]
    annotation_sha256: dict[str, str | None]
    manifest_hash: str


def write_manifest(
    path: str | os.PathLike[str],
    dataset: Dataset,
    split: Split,
    seed: int,
    fractions: Sequence[float],
    group_pattern: str | None,
) -> Manifest:
    """Write the split manifest atomically (temp file + ``os.replace``) and return it."""
    ids = [image_id for part in split for image_id in part]
    content: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "format": dataset.format,
        "seed": int(seed),
        "fractions": [float(f) for f in fractions],
        "group_pattern": group_pattern,
        "splits": {name: list(part) for name, part in zip(SPLIT_NAMES, split, strict=True)},
        "groups": {i: dataset.group_of(i) for i in sorted(ids)},
        "image_sha256": {i: dataset.image_sha256(i) for i in sorted(ids)},
        "annotation_sha256": {i: dataset.annotation_sha256(i) for i in sorted(ids)},
    }
    document = {"root": str(dataset.root), **content, "manifest_hash": _content_hash(content)}
    _write_atomically(Path(path), json.dumps(document, indent=1, sort_keys=True) + "\n")
    return _manifest_from(document, Path(path))


def _content_hash(content: dict[str, Any]) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


_KEYS: dict[str, type | tuple[type, ...]] = {
    "version": int,
    "root": str,
    "format": str,
    "seed": int,
    "fractions": list,
    "group_pattern": (str, type(None)),
    "splits": dict,
    "groups": dict,
    "image_sha256": dict,
    "annotation_sha256": dict,
    "manifest_hash": str,
}


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and check a manifest: keys, types, consistency and ``manifest_hash``.

    Raises:
        UserError: naming the file and what is wrong; re-create it with
            ``sa2va-rl check-data DIR --split-out FILE``.
    """
    source = Path(path)
    if not source.is_file():
        raise UserError(f"split manifest {source} does not exist; {_REMAKE}")
    document = read_json(source)
    if not isinstance(document, dict):
        raise UserError(f"split manifest {source} must be a JSON object; {_REMAKE}")
    for key, kind in _KEYS.items():
        if key not in document:
            raise UserError(f"split manifest {source} has no {key!r}; {_REMAKE}")
        if not isinstance(document[key], kind) or isinstance(document[key], bool):
            raise UserError(f"split manifest {source}: {key!r} has the wrong type; {_REMAKE}")
    if document["version"] != MANIFEST_VERSION:
        raise UserError(
            f"split manifest {source} has version {document['version']}, this code reads "
            f"{MANIFEST_VERSION}; {_REMAKE}"
        )
    return _manifest_from(document, source)


_REMAKE = "re-create it with `sa2va-rl check-data DIR --split-out FILE`"


def _manifest_from(document: dict[str, Any], source: Path) -> Manifest:
    content = {k: v for k, v in document.items() if k not in ("root", "manifest_hash")}
    if _content_hash(content) != document["manifest_hash"]:
        raise UserError(
            f"split manifest {source}: content does not match its manifest_hash (edited by "
            f"hand or damaged); {_REMAKE}"
        )
    splits = document["splits"]
    if sorted(splits) != sorted(SPLIT_NAMES) or not all(
        isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in splits.values()
    ):
        raise UserError(f"split manifest {source}: 'splits' needs train/val/test id lists")
    split = Split(*(list(splits[name]) for name in SPLIT_NAMES))
    _check_consistent(split, document, source)
    return Manifest(
        root=document["root"],
        format=document["format"],
        seed=document["seed"],
        fractions=_check_fractions(document["fractions"]),
        group_pattern=document["group_pattern"],
        split=split,
        groups=dict(document["groups"]),
        image_sha256=dict(document["image_sha256"]),
        annotation_sha256=dict(document["annotation_sha256"]),
        manifest_hash=document["manifest_hash"],
    )


def _check_consistent(split: Split, document: dict[str, Any], source: Path) -> None:
    ids = [image_id for part in split for image_id in part]
    if len(set(ids)) != len(ids):
        raise UserError(f"split manifest {source}: an id appears in two splits; {_REMAKE}")
    for key in ("groups", "image_sha256", "annotation_sha256"):
        if set(document[key]) != set(ids):
            raise UserError(f"split manifest {source}: {key!r} does not cover the split ids")
    side: dict[str, str] = {}
    for name, part in zip(SPLIT_NAMES, split, strict=True):
        for image_id in part:
            group = document["groups"][image_id]
            if side.setdefault(group, name) != name:
                raise UserError(
                    f"split manifest {source}: group {group!r} is in both {side[group]} and "
                    f"{name}; {_REMAKE}"
                )


def check_manifest_matches(manifest: Manifest, dataset: Dataset) -> None:
    """Raise a UserError listing ids whose files changed, vanished or appeared since the split."""
    if manifest.format != dataset.format:
        raise UserError(
            f"the split manifest was made from a {manifest.format} dataset, this one is "
            f"{dataset.format} ({dataset.root}); load it with {option('format')} {manifest.format}"
        )
    problems = []
    for image_id in sorted(manifest.image_sha256):
        if image_id not in dataset:
            problems.append((image_id, "is in the manifest but not in the dataset"))
        elif dataset.image_sha256(image_id) != manifest.image_sha256[image_id]:
            problems.append((image_id, "image file changed since the split was made"))
        elif dataset.annotation_sha256(image_id) != manifest.annotation_sha256[image_id]:
            problems.append((image_id, "ground truth changed since the split was made"))
    problems += [
        (image_id, "is new: not in the manifest")
        for image_id in dataset.ids
        if image_id not in manifest.image_sha256
    ]
    if problems:
        raise UserError(
            f"dataset {dataset.root} does not match the split manifest "
            f"(manifest_hash {manifest.manifest_hash[:12]}):\n{format_problems(problems)}\n"
            "Restore the original files, or make a new split (check-data --split-out); "
            "results of the old split are then not comparable"
        )
