"""The tree search over op sequences gives exactly the exhaustive search's answer, for fewer
op applications."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from envs.mask_ops import OPS, MaskOpsConfig, MaskState, apply_op
from envs.op_search import best_ops_by_dice, search_op_sequences, state_key
from envs.synthetic import generate_samples
from models.frangi import FrangiSegmenter
from models.metrics import mask_metrics
from models.prompts import PROMPT_SETS
from orchestrator.evaluation.oracles import oracle_postprocess_mask

CFG = MaskOpsConfig()
CROP = 112  # crops of real segmentations keep the exhaustive reference fast


def _exhaustive(start: MaskState, score, config: MaskOpsConfig, depth: int):  # type: ignore[no-untyped-def]
    """Every sequence applied from scratch, shortest first, in op order; strictly better wins."""
    usable = [op for op in config.ops if op != "stop"]
    best = (score(start.mask), start, ())
    count = 0
    for length in range(1, depth + 1):
        for seq in itertools.product(usable, repeat=length):
            state = start
            for op in seq:
                state = apply_op(op, state, config)
                count += 1
            value = score(state.mask)
            if value > best[0]:
                best = (value, state, seq)
    return best, count


@pytest.fixture(scope="module")
def cases() -> list[tuple[str, MaskState, np.ndarray]]:
    """Crops of Frangi segmentations of default frames (videos 0, 1, 2; two prompts each), with
    the soft mask, plus one without it (threshold ops are then no-ops)."""
    samples = generate_samples(24)
    segmenter = FrangiSegmenter()
    prompts = PROMPT_SETS["seeds"]
    out = []
    for index, prompt, (r, c) in [
        (0, prompts[0], (150, 200)),
        (3, prompts[6], (260, 120)),
        (9, prompts[1], (200, 240)),
        (12, prompts[7], (120, 300)),
        (17, prompts[0], (300, 260)),
        (22, prompts[4], (180, 180)),
    ]:
        sample = samples[index]
        seg = segmenter.segment(sample.image, prompt)
        assert seg.prob is not None and sample.mask is not None
        window = np.s_[r : r + CROP, c : c + CROP]
        state = MaskState(seg.mask[window].copy(), seg.prob[window].copy())
        out.append((f"{index}:{prompt}", state, sample.mask[window].copy()))
    name, state, gt = out[0]
    out.append((name + " (no prob)", MaskState(state.mask, None), gt))
    return out


def test_equals_the_oracle_s_exhaustive_search_with_fewer_applications(cases: list) -> None:
    exhaustive_count = sum(9**d for d in (1, 2, 3))
    for name, start, gt in cases:
        mask, sequence = oracle_postprocess_mask(start, gt, CFG, depth=3)
        found = best_ops_by_dice(start, gt, CFG, depth=3)
        assert list(found.sequence) == sequence, name
        assert np.array_equal(found.state.mask, mask), name
        assert found.score == mask_metrics(mask, gt).dice, name
        assert found.applications < exhaustive_count, name
        assert found.distinct_states <= found.applications + 1


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_ties_are_broken_like_the_exhaustive_search(cases: list, depth: int) -> None:
    # A score with many ties: closeness of the mask's area to a target area, in 50 px steps.
    _, start, gt = cases[1]
    target = int(gt.sum())

    def score(mask: np.ndarray) -> float:
        return -float(abs(int(mask.sum()) - target) // 50)

    reordered = MaskOpsConfig(ops=("threshold_up", "close", "stop", "dilate", "threshold_down"))
    for config in (CFG, reordered):
        (value, state, seq), count = _exhaustive(start, score, config, depth)
        found = search_op_sequences(start, score, config, depth)
        assert (found.sequence, found.score) == (seq, value)
        assert np.array_equal(found.state.mask, state.mask)
        assert found.state.threshold == state.threshold
        assert found.applications <= count


def test_counts_each_distinct_state_once_and_prunes_repeats() -> None:
    # A single pixel: dilate grows it, erode/open remove it, close/fill/bridge/remove_small(20)
    # change nothing or empty it, so most branches repeat a state.
    mask = np.zeros((15, 15), bool)
    mask[7, 7] = True
    start = MaskState(mask, None)
    found = search_op_sequences(start, lambda m: float(m.sum()), CFG, depth=2)
    # Depth 1 makes 3 distinct states: start (pruned repeats), the cross, the empty mask.
    # Only those 2 new ones are expanded at depth 2 (9 ops each).
    assert found.applications == 9 + 2 * 9
    assert found.sequence == ("dilate", "dilate")
    assert int(found.state.mask.sum()) == 13


def test_threshold_is_part_of_the_state() -> None:
    # A prob far from every reachable threshold: threshold ops move the threshold but the mask
    # stays the same, so mask-only dedupe would wrongly prune them.
    prob = np.full((6, 6), 0.99, np.float32)
    start = MaskState(prob > 0.5, prob, 0.5)
    down = apply_op("threshold_down", start, CFG)
    assert np.array_equal(down.mask, start.mask)
    assert state_key(down) != state_key(start)
    assert state_key(MaskState(start.mask.copy(), prob, 0.5)) == state_key(start)


def test_depth_zero_keeps_the_start_and_negative_depth_is_refused(cases: list) -> None:
    _, start, gt = cases[0]
    found = best_ops_by_dice(start, gt, CFG, depth=0)
    assert found.sequence == () and found.state is start and found.applications == 0
    assert found.distinct_states == 1
    with pytest.raises(ValueError, match="depth must be >= 0"):
        best_ops_by_dice(start, gt, CFG, depth=-1)
    assert "stop" in OPS
