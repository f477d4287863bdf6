"""The no-argument ``gymnasium.make()`` defaults, in one place.

The environments take their samples, segmenter and (experiment 3) reward scorer injected; the
registered gymnasium ids build them through the factories here, which fill in what is missing:

- no ``samples``: ``data=<dir>`` (any supported format; ``manifest=<file>`` fixes the split)
  loaded with :func:`envs.sources.load_samples`, or a small built-in synthetic set
  (:data:`BUILTIN_N` frames, seed 0) split by video like any dataset; ``split`` and
  ``max_images`` choose from it;
- no ``segmenter``: the local Frangi backend behind an in-process memo;
- the reward-guided env without ``reward_net``: a small network trained once on the built-in set
  and cached under ``~/.cache/sa2va-rl`` (keyed by the backend id), or a checkpoint path loaded
  (``expected_backend_id``/``expected_manifest_hash`` refuse one made for another backend or
  split).

A run never comes here: the orchestrator injects the shared workers' client, the run's samples
and its own reward net.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from envs.environments import PostProcessEnv, PromptSelectionEnv, RewardGuidedPromptEnv
from envs.sample import Sample
from envs.sources import SPLITS, load_samples, spread
from envs.split import split_groups
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


@lru_cache(maxsize=1)
def builtin_samples() -> tuple[Sample, ...]:
    """The built-in synthetic set (deterministic)."""
    return tuple(generate_samples(BUILTIN_N, BUILTIN_SEED, BUILTIN_FRAMES_PER_VIDEO))


def builtin_split(split: str) -> list[Sample]:
    """The built-in set's ``split`` (train, val, test or all), split by video."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    samples = builtin_samples()
    if split == "all":
        return list(samples)
    groups: dict[str, list[str]] = {}
    for sample in samples:
        groups.setdefault(sample.group, []).append(sample.id)
    ids = set(getattr(split_groups(groups), split))
    return [s for s in samples if s.id in ids]


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
            builtin_split(split), segmenter, CANDIDATE_PROMPTS, per_image=8, input_size=input_size
        )
        for split in ("train", "val")
    }
    model, _ = train_reward_net(examples["train"], examples["val"], epochs=5)
    metadata = {"input_size": input_size, "backend_id": segmenter.backend_id, "manifest_hash": ""}
    save_checkpoint(path, model, metadata)
    return load_checkpoint(path, backend_id=segmenter.backend_id)


def _samples(kwargs: dict[str, Any], require_masks: bool = True) -> None:
    """Fill ``samples`` from ``data``, ``split``, ``manifest`` and ``max_images`` (or from the
    built-in set)."""
    data = kwargs.pop("data", None)
    split = kwargs.pop("split", "train")
    manifest = kwargs.pop("manifest", None)
    max_images = kwargs.pop("max_images", None)
    if "samples" in kwargs:
        return
    if data is None:
        kwargs["samples"] = spread_builtin(split, max_images)
    else:
        kwargs["samples"] = load_samples(
            data,
            split=split,
            manifest=manifest,
            max_images=max_images,
            require_masks=require_masks,
        )


def spread_builtin(split: str, max_images: int | None) -> list[Sample]:
    """At most ``max_images`` of the built-in ``split``, evenly spaced."""
    chosen = builtin_split(split)
    keep = set(spread([s.id for s in chosen], max_images))
    return [s for s in chosen if s.id in keep]


def prompt_selection(**kwargs: Any) -> PromptSelectionEnv:
    """``sa2va_rl/PromptSelection-v0`` with the defaults above for what is not given."""
    _samples(kwargs)
    kwargs.setdefault("segmenter", default_segmenter())
    return PromptSelectionEnv(**kwargs)


def post_process(**kwargs: Any) -> PostProcessEnv:
    """``sa2va_rl/PostProcess-v0`` with the defaults above for what is not given."""
    _samples(kwargs)
    kwargs.setdefault("segmenter", default_segmenter())
    return PostProcessEnv(**kwargs)


def reward_guided_prompt(
    reward_net: str | Path | RewardScorer | None = None,
    expected_backend_id: str | None = None,
    expected_manifest_hash: str | None = None,
    **kwargs: Any,
) -> RewardGuidedPromptEnv:
    """``sa2va_rl/RewardGuidedPrompt-v0`` with the defaults above for what is not given."""
    _samples(kwargs, require_masks=False)
    segmenter = kwargs.setdefault("segmenter", default_segmenter())
    if reward_net is None:
        scorer = default_reward_scorer(segmenter)
    elif isinstance(reward_net, RewardScorer):
        scorer = reward_net
    else:
        scorer = load_checkpoint(
            reward_net, backend_id=expected_backend_id, manifest_hash=expected_manifest_hash
        )
    return RewardGuidedPromptEnv(reward_net=scorer, **kwargs)
