"""Loading a dataset's samples once per process, from a reference that carries every setting.

A :class:`DataRef` names a dataset and how to read it (folder, format, group pattern,
``skip_bad``, whether masks are required) and, in a run, its split manifest and that
manifest's hash. :func:`load_split` validates the dataset once per process per reference
(:func:`open_dataset` is cached), checks the manifest against it, and decodes only the images
of the split asked for (capped with :func:`spread`); its result is cached too, so every env,
the warm-up and the evaluation of one process share one decoded copy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from envs.datasets import DEFAULT_GROUP_PATTERN, Dataset, load_dataset
from envs.sample import Sample
from envs.split import SPLIT_NAMES, Split, check_manifest_matches, read_manifest, split_dataset
from models.errors import UserError

SPLITS = (*SPLIT_NAMES, "all")


@dataclass(frozen=True)
class DataRef:
    """A dataset and every setting needed to read it the same way in any process.

    Attributes:
        data_dir: the dataset folder (or annotations JSON).
        manifest: the split manifest (``None``: the default seeded split by group).
        manifest_hash: the manifest's ``manifest_hash``; a manifest with another hash is refused
            (the split changed since the reference was made). Empty: not checked.
        format: ``auto``, ``sa2va``, ``coco`` or ``folders``.
        group_pattern: the regex that names each image's group (video); ``None``: one per image.
        skip_bad: leave bad entries out instead of refusing the dataset.
        require_masks: an image without ground truth is a problem.
    """

    data_dir: str
    manifest: str | None = None
    manifest_hash: str = ""
    format: str = "auto"
    group_pattern: str | None = DEFAULT_GROUP_PATTERN
    skip_bad: bool = False
    require_masks: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for Tune's ``params.json`` and env configs)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataRef:
        return cls(**dict(data))


def spread(ids: Sequence[str], n: int | None) -> list[str]:
    """At most ``n`` of ``ids``, evenly spaced so a cap still spans every part of the split."""
    if n is None or n >= len(ids):
        return list(ids)
    picks = np.linspace(0, len(ids) - 1, n).round().astype(int)
    return [ids[i] for i in sorted(set(picks.tolist()))]


@lru_cache(maxsize=4)
def validated_dataset(
    data_dir: str, fmt: str, group_pattern: str | None, skip_bad: bool, require_masks: bool
) -> Dataset:
    """:func:`envs.datasets.load_dataset` once per process per settings (it decodes every
    image to validate it). Call ``validated_dataset.cache_clear()`` to validate afresh."""
    return load_dataset(
        data_dir,
        fmt=fmt,
        group_pattern=group_pattern,
        skip_bad=skip_bad,
        require_masks=require_masks,
    )


def open_dataset(ref: DataRef) -> tuple[Dataset, Split]:
    """The validated dataset of ``ref`` and its split (the dataset validated once per
    process; the manifest read and checked against it)."""
    dataset = validated_dataset(
        ref.data_dir, ref.format, ref.group_pattern, ref.skip_bad, ref.require_masks
    )
    if ref.manifest is None:
        return dataset, split_dataset(dataset)
    manifest = read_manifest(ref.manifest)
    if ref.manifest_hash and manifest.manifest_hash != ref.manifest_hash:
        raise UserError(
            f"split manifest {ref.manifest} has manifest_hash {manifest.manifest_hash[:12]}, "
            f"not {ref.manifest_hash[:12]} as when this run prepared its data: the split "
            "changed under a running job; start a new run with another --output"
        )
    check_manifest_matches(manifest, dataset)
    return dataset, manifest.split


@lru_cache(maxsize=16)
def load_split(ref: DataRef, split: str, max_images: int | None = None) -> tuple[Sample, ...]:
    """The samples of ``split`` (train, val, test or all), capped at ``max_images``; only
    those images are decoded."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    dataset, parts = open_dataset(ref)
    ids = dataset.ids if split == "all" else getattr(parts, split)
    return tuple(dataset.load(i) for i in spread(ids, max_images))


def load_samples(
    data: str | os.PathLike[str],
    *,
    split: str = "train",
    manifest: str | os.PathLike[str] | None = None,
    max_images: int | None = None,
    require_masks: bool = True,
    group_pattern: str | None = DEFAULT_GROUP_PATTERN,
    fmt: str = "auto",
    skip_bad: bool = False,
) -> list[Sample]:
    """:func:`load_split` of the dataset at ``data`` with these settings (a convenience for
    notebooks, tests and benchmarks)."""
    ref = DataRef(
        data_dir=str(Path(data).expanduser()),
        manifest=None if manifest is None else str(manifest),
        format=fmt,
        group_pattern=group_pattern,
        skip_bad=skip_bad,
        require_masks=require_masks,
    )
    return list(load_split(ref, split, max_images))
