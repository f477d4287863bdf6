"""Exact-answer unit tests of the evaluation statistics and methods (no Ray, no model).

A hand-built segmenter whose answer per (image, prompt) is a fixed mask makes every Dice known
in advance; the bootstrap is checked on data whose CI is known exactly.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from envs.mask_ops import MaskOpsConfig, MaskState, apply_op
from envs.sample import Sample
from models.metrics import mask_metrics
from models.segmentation import Segmentation
from orchestrator.evaluation.examples import example_mask_path, pick_examples, read_mask_png
from orchestrator.evaluation.methods import Evaluator, best_fixed_prompt
from orchestrator.evaluation.oracles import oracle_postprocess_mask
from orchestrator.evaluation.per_image import ImageResult
from orchestrator.evaluation.statistics import (
    Estimate,
    bootstrap_mean,
    paired_difference,
    summarise,
    verdict,
)

SIZE = 16


def _mask(rows: slice, cols: slice) -> np.ndarray:
    out = np.zeros((SIZE, SIZE), bool)
    out[rows, cols] = True
    return out


def _image(seed: int) -> np.ndarray:
    return np.full((SIZE, SIZE, 3), seed, np.uint8)


class TableSegmenter:
    """Answers ``table[(image value, prompt)]``: a fixed mask per image and prompt."""

    backend_id = "table-v1"

    def __init__(self, table: dict[tuple[int, str], np.ndarray]) -> None:
        self.table = table
        self.calls: list[tuple[int, str]] = []

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        key = (int(image[0, 0, 0]), prompt)
        self.calls.append(key)
        return Segmentation(mask=self.table[key].copy())


# Ground truth: rows 0-7 x cols 0-7 (64 px) on every image.
GT = _mask(slice(0, 8), slice(0, 8))
HALF = _mask(slice(0, 8), slice(0, 4))  # 32 px inside GT: Dice 2*32/96 = 2/3
EMPTY = np.zeros((SIZE, SIZE), bool)  # Dice 0


def _samples(n: int) -> list[Sample]:
    return [Sample(f"img{i}.png", f"g{i}", _image(i), GT.copy()) for i in range(n)]


# --- bootstrap -----------------------------------------------------------------------------------
def test_bootstrap_of_constant_values_collapses_to_the_value() -> None:
    assert bootstrap_mean([0.75] * 7) == Estimate(0.75, 0.75, 0.75)


def test_bootstrap_of_zero_and_one_spans_the_whole_range() -> None:
    # Resampled means of [0, 1] are 0, 0.5 or 1 with probability 1/4, 1/2, 1/4: the 2.5th and
    # 97.5th percentiles of 2,000 of them are 0 and 1.
    assert bootstrap_mean([0.0, 1.0]) == Estimate(0.5, 0.0, 1.0)


def test_bootstrap_is_seeded_and_its_ci_contains_the_mean() -> None:
    values = [0.1, 0.4, 0.35, 0.8, 0.62, 0.05]
    first = bootstrap_mean(values, seed=3)
    assert first == bootstrap_mean(values, seed=3)
    assert first.mean == pytest.approx(np.mean(values))
    assert first.low < first.mean < first.high


def test_bootstrap_refuses_no_values() -> None:
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean([])


def _rows(method: str, dices: list[float]) -> list[ImageResult]:
    return [ImageResult(method, f"img{i}", d, d, d, d) for i, d in enumerate(dices)]


def test_paired_difference_of_a_constant_shift_is_exact() -> None:
    base = _rows("baseline", [0.25, 0.5, 0.75, 0.5])
    shifted = _rows("prompt_rl", [0.5, 0.75, 1.0, 0.75])  # +0.25 on every image (exact in binary)
    diff = paired_difference(shifted, base)
    assert diff == {name: Estimate(0.25, 0.25, 0.25) for name in diff}
    assert sorted(diff) == ["dice", "iou", "precision", "recall"]


def test_paired_difference_uses_only_shared_images() -> None:
    base = _rows("baseline", [0.5, 0.5])
    other = ImageResult("x", "img1", 0.75, 0.75, 0.75, 0.75)
    assert paired_difference([other], base)["dice"] == Estimate(0.25, 0.25, 0.25)
    assert paired_difference([ImageResult("x", "zzz", 0.75, 0.75, 0.75, 0.75)], base) == {}


def test_summarise_gives_paired_differences_to_baseline_and_best_fixed_prompt() -> None:
    rows = [
        *_rows("baseline", [0.25, 0.5, 0.75]),
        *_rows("best_fixed_prompt", [0.5, 0.75, 1.0]),
        *_rows("prompt_rl", [0.5, 0.75, 1.0]),
    ]
    summaries = summarise(rows)
    assert list(summaries) == ["baseline", "best_fixed_prompt", "prompt_rl"]
    rl = summaries["prompt_rl"]
    assert rl.n == 3
    assert rl.metrics["dice"].mean == 0.75
    assert rl.vs_baseline["dice"] == Estimate(0.25, 0.25, 0.25)
    assert rl.paired["best_fixed_prompt"]["recall"] == Estimate(0.0, 0.0, 0.0)
    assert summaries["baseline"].vs_baseline["dice"] == Estimate(0.0, 0.0, 0.0)


def test_summarise_without_references_has_no_paired_differences() -> None:
    summaries = summarise(_rows("prompt_rl", [0.5, 0.25]))
    assert summaries["prompt_rl"].paired == {}
    assert summaries["prompt_rl"].vs_baseline == {}


@pytest.mark.parametrize(
    ("estimate", "expected"),
    [
        (Estimate(0.02, 0.01, 0.03), "better"),
        (Estimate(-0.02, -0.03, -0.01), "worse"),
        (Estimate(0.02, -0.01, 0.05), "no significant difference"),
        (Estimate(0.02, 0.0, 0.05), "no significant difference"),  # a CI touching 0 includes it
        (Estimate(0.0, 0.0, 0.0), "no significant difference"),
    ],
)
def test_verdict_is_significant_only_when_the_ci_excludes_zero(
    estimate: Estimate, expected: str
) -> None:
    assert verdict(estimate) == expected


# --- oracle post-processing ----------------------------------------------------------------------
def _start_with_hole_and_speck() -> tuple[MaskState, np.ndarray]:
    gt = _mask(slice(2, 12), slice(2, 12))
    start = gt.copy()
    start[6:8, 6:8] = False  # a 4-px hole: fill_holes closes it
    start[14:16, 14:16] = True  # a 4-px speck: remove_small drops it
    return MaskState(start, None), gt


OPS = MaskOpsConfig(ops=("dilate", "erode", "fill_holes", "remove_small", "stop"))


def test_oracle_postprocess_finds_the_known_best_sequence() -> None:
    start, gt = _start_with_hole_and_speck()
    mask, sequence = oracle_postprocess_mask(start, gt, OPS, depth=2)
    assert sequence == ["fill_holes", "remove_small"]
    assert np.array_equal(mask, gt)


def test_oracle_postprocess_matches_brute_force_at_every_depth() -> None:
    start, gt = _start_with_hole_and_speck()
    usable = [op for op in OPS.ops if op != "stop"]
    for depth in (0, 1, 2):
        best = mask_metrics(start.mask, gt).dice
        for length in range(1, depth + 1):
            for seq in itertools.product(usable, repeat=length):
                state = start
                for op in seq:
                    state = apply_op(op, state, OPS)
                best = max(best, mask_metrics(state.mask, gt).dice)
        mask, _ = oracle_postprocess_mask(start, gt, OPS, depth=depth)
        assert mask_metrics(mask, gt).dice == best


def test_oracle_postprocess_keeps_the_start_when_nothing_helps() -> None:
    gt = _mask(slice(2, 12), slice(2, 12))
    mask, sequence = oracle_postprocess_mask(MaskState(gt.copy(), None), gt, OPS, depth=2)
    assert sequence == []
    assert np.array_equal(mask, gt)


# --- best fixed prompt and the evaluator ---------------------------------------------------------
def test_best_fixed_prompt_is_the_prompt_with_the_best_mean_dice() -> None:
    # "sharp" is perfect on image 0 and empty on image 1 (mean 0.5); "steady" is 2/3 on both.
    table = {
        (0, "sharp"): GT,
        (1, "sharp"): EMPTY,
        (0, "steady"): HALF,
        (1, "steady"): HALF,
        (0, "blank"): EMPTY,
        (1, "blank"): EMPTY,
    }
    segmenter = TableSegmenter(table)
    assert best_fixed_prompt(_samples(2), segmenter, ["sharp", "steady", "blank"]) == "steady"


def test_best_fixed_prompt_breaks_ties_by_order() -> None:
    table = {(0, "a"): HALF, (0, "b"): HALF}
    assert best_fixed_prompt(_samples(1), TableSegmenter(table), ["b", "a"]) == "b"


def test_pick_examples_takes_worst_median_best_baseline_dice() -> None:
    rows = [
        ImageResult("baseline", i, d, 0, 0, 0)
        for i, d in [("e", 0.9), ("a", 0.1), ("c", 0.5), ("b", 0.5), ("d", 0.7)]
    ]
    assert pick_examples(rows) == {"worst": "a", "median": "c", "best": "e"}
    one = [ImageResult("baseline", "only", 0.3, 0, 0, 0)]
    assert pick_examples(one) == {"worst": "only", "median": "only", "best": "only"}


def _evaluator(tmp_path: Path | None, n: int = 5) -> Evaluator:
    # Image i: the default prompt finds i/4 of the GT's columns, the "wide" prompt all of it.
    table = {}
    for i in range(n):
        table[(i, "default")] = _mask(slice(0, 8), slice(0, 2 * i))
        table[(i, "wide")] = GT
    return Evaluator(
        test=_samples(n),
        segmenter=TableSegmenter(table),
        prompts=("default", "wide"),
        default_prompt="default",
        max_steps=2,
        ops=OPS,
        examples_dir=tmp_path,
    )


def test_evaluator_saves_every_methods_masks_of_the_example_images(tmp_path: Path) -> None:
    evaluator = _evaluator(tmp_path)
    base = evaluator.baseline()
    assert [r.dice for r in base] == [
        mask_metrics(_mask(slice(0, 8), slice(0, 2 * i)), GT).dice for i in range(5)
    ]
    assert evaluator.keep_ids == {"img0.png", "img2.png", "img4.png"}
    rows = evaluator.fixed_prompt("best_fixed_prompt", "wide") + evaluator.oracle_prompt()
    assert all(r.dice == 1.0 for r in rows)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == sorted(
        example_mask_path(tmp_path, method, image_id).name
        for method in ("baseline", "best_fixed_prompt", "oracle_prompt")
        for image_id in ("img0.png", "img2.png", "img4.png")
    )
    assert np.array_equal(
        read_mask_png(example_mask_path(tmp_path, "baseline", "img2.png")),
        _mask(slice(0, 8), slice(0, 4)),
    )
    assert np.array_equal(
        read_mask_png(example_mask_path(tmp_path, "oracle_prompt", "img0.png")), GT
    )


def test_evaluator_without_examples_dir_saves_nothing() -> None:
    evaluator = _evaluator(None)
    evaluator.baseline()
    assert evaluator.keep_ids == frozenset()


def test_oracle_prompt_is_at_least_every_single_prompt_per_image() -> None:
    evaluator = _evaluator(None)
    oracle = {r.image_id: r.dice for r in evaluator.oracle_prompt()}
    for prompt in evaluator.prompts:
        for row in evaluator.fixed_prompt(prompt, prompt):
            assert oracle[row.image_id] >= row.dice


def test_example_mask_path_is_a_safe_file_name(tmp_path: Path) -> None:
    path = example_mask_path(tmp_path, "prompt_rl", "sub/dir/synth(001) frame:1.jpg")
    assert path.parent == tmp_path
    assert path.name == "prompt_rl__sub_dir_synth(001)_frame_1.jpg.png"
