"""Where environments get their images, segmenter and reward network when not handed them.

- ``data=None``: a small built-in synthetic set (:data:`BUILTIN_N` frames, seed 0), split by video
  like any dataset, so ``gymnasium.make(id)`` works with no arguments.
- ``data=<dir>``: a dataset in any supported format; ``manifest=<file>`` fixes the split (every
  step of a run uses the same images), otherwise the default seeded group split is used.
- ``segmenter=None``: the local Frangi backend behind an in-process memo.
- the reward-guided env without ``reward_net``: a small network trained once on the built-in set
  and cached under ``~/.cache/sa2va-rl`` (keyed by the backend id).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from envs.datasets import DEFAULT_GROUP_PATTERN, load_dataset
from envs.sample import Sample
from envs.split import (
    SPLIT_NAMES,
    check_manifest_matches,
    read_manifest,
    split_dataset,
    split_groups,
)
from envs.synthetic import generate_samples
from models.errors import UserError
from models.prompts import CANDIDATE_PROMPTS
from models.reward_net import (
    CHECKPOINT_VERSION,
    RewardScorer,
    load_checkpoint,
    save_checkpoint,
    train_reward_net,
)
from models.segmentation import MemoSegmenter, Segmenter

log = logging.getLogger(__name__)

BUILTIN_N = 24
BUILTIN_FRAMES_PER_VIDEO = 4
BUILTIN_SEED = 0
CACHE_ROOT = Path(os.environ.get("SA2VA_RL_CACHE", "~/.cache/sa2va-rl")).expanduser()
SPLITS = (*SPLIT_NAMES, "all")


@lru_cache(maxsize=1)
def builtin_samples() -> tuple[Sample, ...]:
    """The built-in synthetic set (deterministic)."""
    return tuple(generate_samples(BUILTIN_N, BUILTIN_SEED, BUILTIN_FRAMES_PER_VIDEO))


def _builtin_split(split: str) -> list[Sample]:
    samples = builtin_samples()
    if split == "all":
        return list(samples)
    groups: dict[str, list[str]] = {}
    for sample in samples:
        groups.setdefault(sample.group, []).append(sample.id)
    ids = set(getattr(split_groups(groups), split))
    return [s for s in samples if s.id in ids]


def spread(ids: Sequence[str], n: int | None) -> list[str]:
    """At most ``n`` of ``ids``, evenly spaced so a cap still spans every part of the split."""
    if n is None or n >= len(ids):
        return list(ids)
    picks = np.linspace(0, len(ids) - 1, n).round().astype(int)
    return [ids[i] for i in sorted(set(picks.tolist()))]


def load_samples(
    data: str | os.PathLike[str] | None,
    *,
    split: str = "train",
    manifest: str | os.PathLike[str] | None = None,
    max_images: int | None = None,
    samples: Sequence[Sample] | None = None,
    require_masks: bool = True,
    group_pattern: str | None = DEFAULT_GROUP_PATTERN,
) -> list[Sample]:
    """The samples of ``split`` (train, val, test or all), capped at ``max_images``."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if samples is not None:
        chosen = list(samples)
    elif data is None:
        chosen = _builtin_split(split)
    else:
        dataset = load_dataset(data, group_pattern=group_pattern, require_masks=require_masks)
        if manifest is not None:
            parsed = read_manifest(manifest)
            check_manifest_matches(parsed, dataset)
            parts = parsed.split
        else:
            parts = split_dataset(dataset)
        ids = dataset.ids if split == "all" else getattr(parts, split)
        return [dataset.load(i) for i in spread(ids, max_images)]
    keep = set(spread([s.id for s in chosen], max_images))
    return [s for s in chosen if s.id in keep]


@lru_cache(maxsize=1)
def default_segmenter() -> MemoSegmenter:
    """The local Frangi backend behind an in-process memo (shared by envs in this process)."""
    from models.frangi import FrangiSegmenter

    return MemoSegmenter(FrangiSegmenter())


def default_reward_scorer(segmenter: Segmenter, input_size: int = 64) -> RewardScorer:
    """A small reward network for the built-in set, trained on first use and cached on disk."""
    from envs.reward_data import build_examples

    # The prompt list is part of the recipe: a backend id (e.g. Sa2VA's) need not cover it.
    prompts = hashlib.sha256("\n".join(CANDIDATE_PROMPTS).encode()).hexdigest()[:12]
    recipe = f"{segmenter.backend_id}|{BUILTIN_N}|{input_size}|v{CHECKPOINT_VERSION}|{prompts}"
    key = hashlib.sha256(recipe.encode()).hexdigest()
    path = CACHE_ROOT / "reward_net" / f"builtin-{key[:16]}.pt"
    if path.is_file():
        return load_checkpoint(path, backend_id=segmenter.backend_id)
    log.warning("training the built-in reward network once (cached at %s)", path)
    examples = {
        split: build_examples(
            _builtin_split(split), segmenter, CANDIDATE_PROMPTS, per_image=8, input_size=input_size
        )
        for split in ("train", "val")
    }
    model, _ = train_reward_net(examples["train"], examples["val"], epochs=5)
    metadata = {"input_size": input_size, "backend_id": segmenter.backend_id, "manifest_hash": ""}
    save_checkpoint(path, model, metadata)
    return load_checkpoint(path, backend_id=segmenter.backend_id)
