"""Known-answer tests of the video- and seed-level bootstrap (:mod:`.statistics`)."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.evaluation.per_image import ImageResult
from orchestrator.evaluation.statistics import Estimate, bootstrap_mean, summarise

# 8 videos, one value each (multiples of 1/8: every sum below is exact in binary).
VIDEO_VALUES = [0.125, 0.5, 0.25, 0.875, 0.625, 0.375, 0.75, 0.0]
FRAMES = 4


def _frames() -> tuple[list[float], list[str]]:
    values = [v for v in VIDEO_VALUES for _ in range(FRAMES)]
    groups = [f"video{k}" for k in range(len(VIDEO_VALUES)) for _ in range(FRAMES)]
    return values, groups


def test_identical_frames_within_a_video_give_the_ci_of_one_frame_per_video() -> None:
    values, groups = _frames()
    one_per_video = bootstrap_mean(VIDEO_VALUES, seed=5)
    assert bootstrap_mean(values, groups=groups, seed=5) == one_per_video
    # The image-level CI treats the 32 near-duplicate frames as independent: far too narrow.
    naive = bootstrap_mean(values, seed=5)
    assert naive.mean == one_per_video.mean == 0.4375
    assert naive.high - naive.low < 0.6 * (one_per_video.high - one_per_video.low)


def test_a_video_weighs_by_its_frames() -> None:
    # Video a: 3 frames of 1.0; video b: 1 frame of 0.0. Resampled pairs: aa (1.0), ab/ba (0.75),
    # bb (0.0) with probability 1/4, 1/2, 1/4: the CI spans [0, 1]; the mean is the frame mean.
    estimate = bootstrap_mean([1.0, 1.0, 1.0, 0.0], groups=["a", "a", "a", "b"])
    assert estimate == Estimate(0.75, 0.0, 1.0)


def test_seeds_are_resampled_as_a_stratum_of_their_own() -> None:
    # Two seeds, constant within each: resampling videos changes nothing, resampling seeds
    # gives 0.25 / 0.5 / 0.75 with probability 1/4, 1/2, 1/4.
    _, groups = _frames()
    per_seed = np.array([[0.25] * len(groups), [0.75] * len(groups)])
    assert bootstrap_mean(per_seed, groups=groups) == Estimate(0.5, 0.25, 0.75)


def test_bootstrap_refuses_groups_that_do_not_match_the_values() -> None:
    with pytest.raises(ValueError, match="3 groups for 2 values"):
        bootstrap_mean([0.5, 0.5], groups=["a", "b", "c"])


def _rows(method: str, dices: list[float], seed: int = 0) -> list[ImageResult]:
    return [ImageResult(method, f"img{i}", d, d, d, d, seed=seed) for i, d in enumerate(dices)]


def test_summarise_aggregates_seeds_and_resamples_videos() -> None:
    groups = {"img0": "v0", "img1": "v0", "img2": "v1", "img3": "v1"}
    rows = [
        *_rows("baseline", [0.5, 0.5, 0.25, 0.25]),
        *_rows("prompt_rl", [0.75, 0.75, 0.5, 0.5], seed=0),
        *_rows("prompt_rl", [0.5, 0.5, 0.25, 0.25], seed=1),
    ]
    summaries = summarise(rows, groups=groups)
    rl = summaries["prompt_rl"]
    assert (rl.n, rl.videos, rl.seeds) == (4, 2, 2)
    assert rl.per_seed == {0: {m: 0.625 for m in rl.metrics}, 1: {m: 0.375 for m in rl.metrics}}
    assert rl.metrics["dice"].mean == 0.5
    # Seed 0 is +0.25 on every image, seed 1 +0.0: the paired CI spans both seeds.
    assert rl.vs_baseline["dice"] == Estimate(0.125, 0.0, 0.25)
    assert summaries["baseline"].metrics["dice"] == Estimate(0.375, 0.25, 0.5)
    assert summaries["baseline"].per_seed == {0: {m: 0.375 for m in rl.metrics}}
