"""Exact behaviour of the mask operations on hand-made masks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from envs.mask_ops import (
    ALL_OPS,
    OPS,
    ORIGINAL_OPS,
    PROB_OPS,
    MaskOpsConfig,
    MaskState,
    apply_action,
    apply_op,
    op_available,
)
from models.errors import UserError
from models.segmentation import Segmentation

CFG = MaskOpsConfig()


def _components(mask: np.ndarray) -> int:
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


def _run(name: str, mask: np.ndarray, config: MaskOpsConfig = CFG) -> np.ndarray:
    return apply_op(name, MaskState(mask, None), config).mask


def _ramp_state(threshold: float = 0.5) -> MaskState:
    # Columns hold 0.05, 0.15, ..., 0.95: no value sits on a reachable threshold.
    prob = np.tile((np.arange(10, dtype=np.float32) + 0.5) / 10, (4, 1))
    return MaskState(prob > threshold, prob, threshold)


# --- registry and config -------------------------------------------------------------------


def test_ops_order_is_fixed() -> None:
    assert OPS == (
        "dilate",
        "erode",
        "open",
        "close",
        "fill_holes",
        "remove_small",
        "bridge_gaps",
        "threshold_down",
        "threshold_up",
        "stop",
    )
    assert CFG.ops == OPS


def test_action_index_follows_config_subset() -> None:
    cfg = MaskOpsConfig(ops=("stop", "dilate"))
    mask = np.zeros((9, 9), bool)
    mask[4, 4] = True
    state = MaskState(mask, None)
    assert apply_action(0, state, cfg) is state
    assert int(apply_action(1, state, cfg).mask.sum()) == 5
    with pytest.raises(ValueError, match="out of range"):
        apply_action(2, state, cfg)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("close_kernel", 4, r"close_kernel = 4 .*odd integer in \[3, 31\]"),
        ("dilate_kernel", 33, r"dilate_kernel = 33 .*\[3, 31\]"),
        ("erode_kernel", True, r"erode_kernel = True"),
        ("min_component_area", 0, r"min_component_area = 0 .*\[1, 1000000\]"),
        ("bridge_max_gap", 0.5, r"bridge_max_gap = 0.5 .*\[1.0, 100.0\]"),
        ("bridge_max_angle_deg", 91, r"bridge_max_angle_deg = 91"),
        ("bridge_max_width", 4, r"bridge_max_width = 4 .*odd"),
        ("threshold_step", 0.0, r"threshold_step = 0.0 .*\(0.0, 0.5\]"),
        ("threshold_step", float("nan"), r"threshold_step = nan"),
        ("threshold_min", 0.95, r"threshold_min = 0.95 .*below threshold_max"),
        ("kernel_shape", "disk", r"kernel_shape = 'disk' .*ellipse"),
        ("ops", ("dilate", "explode"), r"unknown operation\(s\) \['explode'\]"),
        ("ops", ("dilate", "dilate"), r"twice"),
        ("action_set", "seeds", r"action_set = 'seeds' .*\['original', 'project'\]"),
        ("threshold_factor", 1.0, r"threshold_factor = 1.0 .*below 1"),
        ("grow_threshold", 0.8, r"grow_threshold = 0.8 .*below grow_seed_threshold"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        MaskOpsConfig(**{field: value})  # type: ignore[arg-type]


def test_config_from_dict() -> None:
    cfg = MaskOpsConfig.from_dict({"ops": ["dilate", "stop"], "close_kernel": 7})
    assert cfg.ops == ("dilate", "stop")
    assert cfg.close_kernel == 7
    with pytest.raises(UserError, match=r"unknown key\(s\) \['kernel'\]"):
        MaskOpsConfig.from_dict({"kernel": 3})
    with pytest.raises(UserError, match=r"ops = 'stop' .*non-empty list"):
        MaskOpsConfig.from_dict({"ops": "stop"})


def test_state_validation_and_from_segmentation() -> None:
    with pytest.raises(ValueError, match="bool"):
        MaskState(np.zeros((3, 3), np.uint8), None)
    with pytest.raises(ValueError, match="float32"):
        MaskState(np.zeros((3, 3), bool), np.zeros((3, 3), np.float64))
    prob = np.full((3, 3), 0.7, np.float32)
    state = MaskState.from_segmentation(Segmentation(mask=prob > 0.5, prob=prob))
    assert state.threshold == 0.5
    assert state.prob is prob
    assert state.mask.all()


# --- morphology ----------------------------------------------------------------------------


def test_dilate_exact_counts() -> None:
    mask = np.zeros((11, 11), bool)
    mask[5, 5] = True
    # The default 3x3 ellipse is a cross: 1 + 4 px; a 3x3 rect gives 9.
    assert int(_run("dilate", mask).sum()) == 5
    assert int(_run("dilate", mask, MaskOpsConfig(kernel_shape="rect")).sum()) == 9
    assert (
        int(_run("dilate", mask, MaskOpsConfig(dilate_kernel=5, kernel_shape="rect")).sum()) == 25
    )


def test_erode_exact_counts_and_border() -> None:
    mask = np.zeros((11, 11), bool)
    mask[3:8, 3:8] = True
    eroded = _run("erode", mask)
    assert int(eroded.sum()) == 9
    assert eroded[4:7, 4:7].all()
    # The image border does not erode: a square in the corner loses only its inner sides.
    corner = np.zeros((11, 11), bool)
    corner[0:5, 0:5] = True
    expected = np.zeros((11, 11), bool)
    expected[0:4, 0:4] = True
    np.testing.assert_array_equal(_run("erode", corner), expected)


def test_open_removes_speck_and_rounds_square() -> None:
    mask = np.zeros((15, 15), bool)
    mask[3:8, 3:8] = True
    mask[11:13, 11:13] = True  # 2x2 speck: no pixel keeps all four cross neighbours
    opened = _run("open", mask)
    assert int(opened.sum()) == 21  # the 5x5 square minus its 4 corners
    assert not opened[11:13, 11:13].any()


def test_close_fills_one_px_gap() -> None:
    mask = np.zeros((15, 20), bool)
    mask[5:10, 3:8] = True
    mask[5:10, 9:14] = True
    closed = _run("close", mask)
    assert closed[6:9, 8].all()
    # The 5x5 ellipse has no corners, so the gap's two end pixels stay open.
    assert not closed[5, 8] and not closed[9, 8]
    assert int(closed.sum()) == 53
    assert (closed | mask).sum() == closed.sum()  # closing only adds


def test_fill_holes_small_only() -> None:
    mask = np.zeros((40, 40), bool)
    mask[2:9, 2:9] = True
    mask[4:7, 4:7] = False  # 3x3 hole: filled
    mask[15:35, 15:35] = True
    mask[18:32, 18:32] = False  # 14x14 = 196 px hole > 64: a vessel loop, kept
    filled = _run("fill_holes", mask)
    assert filled[4:7, 4:7].all()
    assert not filled[18:32, 18:32].any()
    assert int(filled.sum()) == int(mask.sum()) + 9


def test_fill_holes_ignores_border_regions_and_uses_4_connected_background() -> None:
    mask = np.zeros((10, 10), bool)
    mask[0:4, 3] = True
    mask[3, 0:4] = True  # encloses a 3x3 pocket against the image corner: not a hole
    assert int(_run("fill_holes", mask).sum()) == int(mask.sum())
    ring = np.zeros((10, 10), bool)
    ring[5:9, 5:9] = True
    ring[6:8, 6:8] = False
    ring[5, 5] = False  # the inside touches the outside only diagonally: still a hole
    out = _run("fill_holes", ring)
    assert out[6:8, 6:8].all()
    assert not out[5, 5]


def test_remove_small_threshold_is_inclusive() -> None:
    mask = np.zeros((30, 30), bool)
    mask[1, 1:3] = True  # 2 px speck
    mask[5, 0:20] = True  # 20 px: stays with min_component_area=20
    mask[10, 0:19] = True  # 19 px: removed
    out = _run("remove_small", mask, MaskOpsConfig(min_component_area=20))
    expected = np.zeros((30, 30), bool)
    expected[5, 0:20] = True
    np.testing.assert_array_equal(out, expected)
    # Diagonal neighbours count as connected (8-connectivity).
    diag = np.eye(5, dtype=bool)
    np.testing.assert_array_equal(
        _run("remove_small", diag, MaskOpsConfig(min_component_area=5)), diag
    )


# --- connectivity repair -------------------------------------------------------------------


def test_bridge_one_px_gap_exactly() -> None:
    mask = np.zeros((21, 41), bool)
    mask[10, 5:21] = True
    mask[10, 22:36] = True
    out = _run("bridge_gaps", mask)
    expected = mask.copy()
    expected[10, 21] = True
    np.testing.assert_array_equal(out, expected)


def test_bridge_diagonal_gap_and_exact_width() -> None:
    mask = np.zeros((40, 40), bool)
    for i in range(5, 15):
        mask[i, i] = True
    for i in range(19, 30):
        mask[i, i] = True
    out = _run("bridge_gaps", mask)
    expected = mask.copy()
    for i in range(15, 19):
        expected[i, i] = True
    np.testing.assert_array_equal(out, expected)


def test_bridge_thick_vessel_keeps_width() -> None:
    mask = np.zeros((40, 60), bool)
    mask[15:20, 2:25] = True
    mask[15:20, 31:55] = True
    out = _run("bridge_gaps", mask)
    assert _components(out) == 1
    assert (out | mask).sum() == out.sum()
    # The bridge is 5 px wide, like the vessel (its centre follows the skeleton tip).
    gap_columns = out[:, 26:30]
    assert (gap_columns.sum(axis=0) == 5).all()


def test_bridge_tip_to_vessel_side() -> None:
    mask = np.zeros((30, 30), bool)
    mask[15, 2:15] = True  # tip at column 14 points right
    mask[5:25, 20] = True  # a vertical vessel 6 px ahead
    out = _run("bridge_gaps", mask)
    expected = mask.copy()
    expected[15, 15:20] = True
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "other",
    [
        # Off to the side: 51 degrees from the tip's direction (and 39 degrees from its own).
        [(r, 24) for r in range(0, 6)],
        [(10, c) for c in range(34, 45)],  # straight ahead but 14 px > 12 px away
    ],
)
def test_bridge_refuses_misaligned_or_far_segments(other: list[tuple[int, int]]) -> None:
    mask = np.zeros((21, 50), bool)
    mask[10, 5:21] = True
    for r, c in other:
        mask[r, c] = True
    np.testing.assert_array_equal(_run("bridge_gaps", mask), mask)


def test_bridge_specks_are_targets_not_sources() -> None:
    mask = np.zeros((21, 41), bool)
    mask[10, 5:21] = True
    mask[10, 24] = True  # speck 4 px ahead of the tip: linked
    mask[2, 35] = True  # speck far from everything: stays alone
    out = _run("bridge_gaps", mask)
    assert out[10, 5:25].all()
    assert _components(out) == 2
    assert int(out.sum()) == int(mask.sum()) + 3


def test_bridge_joins_two_components_once() -> None:
    # Two tips face each other across the gap; one bridge suffices.
    mask = np.zeros((21, 41), bool)
    mask[10, 5:15] = True
    mask[10, 20:30] = True
    out = _run("bridge_gaps", mask)
    expected = mask.copy()
    expected[10, 15:20] = True
    np.testing.assert_array_equal(out, expected)


# --- thresholds ----------------------------------------------------------------------------


def test_threshold_ops_exact_on_ramp() -> None:
    state = _ramp_state()
    assert int(state.mask[0].sum()) == 5
    down = apply_op("threshold_down", state, CFG)
    assert down.threshold == 0.4
    assert int(down.mask[0].sum()) == 6
    twice = apply_op("threshold_down", apply_op("threshold_down", down, CFG), CFG)
    assert twice.threshold == 0.2
    assert int(twice.mask[0].sum()) == 8
    up = apply_op("threshold_up", state, CFG)
    assert up.threshold == 0.6
    np.testing.assert_array_equal(up.mask[0], np.arange(10) >= 6)


def test_threshold_clips_to_range() -> None:
    cfg = MaskOpsConfig(threshold_step=0.3, threshold_min=0.1, threshold_max=0.8)
    state = _ramp_state()
    low = apply_op("threshold_down", apply_op("threshold_down", state, cfg), cfg)
    assert low.threshold == 0.1
    assert int(low.mask[0].sum()) == 9
    high = apply_op("threshold_up", apply_op("threshold_up", state, cfg), cfg)
    assert high.threshold == 0.8
    assert int(high.mask[0].sum()) == 2


def test_threshold_rebuilds_mask_discarding_morphology() -> None:
    state = _ramp_state()
    dilated = apply_op("dilate", state, CFG)
    assert int(dilated.mask[0].sum()) == 6
    assert dilated.threshold == 0.5 and dilated.prob is state.prob
    rethresholded = apply_op("threshold_up", dilated, CFG)
    assert state.prob is not None
    np.testing.assert_array_equal(rethresholded.mask, state.prob > 0.6)


def test_threshold_without_prob_is_noop() -> None:
    state = MaskState(np.eye(4, dtype=bool), None)
    for name in ("threshold_down", "threshold_up"):
        assert apply_op(name, state, CFG) is state
        assert not op_available(name, state)
    assert op_available("dilate", state)
    assert op_available("threshold_up", _ramp_state())


# --- general properties --------------------------------------------------------------------


def test_stop_returns_state() -> None:
    state = _ramp_state()
    assert apply_op("stop", state, CFG) is state


def test_unknown_op_raises() -> None:
    with pytest.raises(ValueError, match="unknown mask operation 'explode'"):
        apply_op("explode", _ramp_state(), CFG)
    with pytest.raises(ValueError):
        op_available("explode", _ramp_state())


def test_ops_are_pure_and_deterministic() -> None:
    rng = np.random.default_rng(3)
    prob = cv2.GaussianBlur(rng.random((64, 64)).astype(np.float32), (7, 7), 0)
    state = MaskState(prob > 0.5, prob)
    mask_before, prob_before = state.mask.copy(), prob.copy()
    for name in OPS:
        first = apply_op(name, state, CFG)
        second = apply_op(name, state, CFG)
        np.testing.assert_array_equal(first.mask, second.mask)
        assert first.mask.dtype == np.bool_ and first.mask.shape == (64, 64)
        np.testing.assert_array_equal(state.mask, mask_before)
        np.testing.assert_array_equal(prob, prob_before)


def test_empty_and_full_masks() -> None:
    for fill in (False, True):
        mask = np.full((16, 16), fill)
        for name in OPS:
            out = apply_op(name, MaskState(mask, None), CFG).mask
            np.testing.assert_array_equal(out, mask, err_msg=name)


def test_every_op_accepts_read_only_arrays() -> None:
    """Masks and soft masks arriving from Ray workers are read-only views."""
    from envs.features import observation

    mask = np.zeros((32, 32), bool)
    mask[10, 2:12] = True
    mask[10, 15:30] = True
    mask[20:23, 5:9] = True
    prob = mask.astype(np.float32) * 0.8
    mask.flags.writeable = False
    prob.flags.writeable = False
    state = MaskState(mask=mask, prob=prob)
    config = MaskOpsConfig()
    for name in OPS:
        assert apply_op(name, state, config).mask.shape == (32, 32)
    image = np.zeros((32, 32, 3), np.uint8)
    assert observation(image, mask, prob, 0, 3).dtype == np.float32


# --- the original team's action set ---------------------------------------------------------


def test_named_action_sets() -> None:
    assert MaskOpsConfig().ops == OPS and MaskOpsConfig().set_name == "project"
    original = MaskOpsConfig(action_set="original")
    assert (
        original.ops
        == ORIGINAL_OPS
        == (
            "lower_threshold",
            "dilate_3",
            "dilate_5",
            "close",
            "bridge_gaps",
            "grow_region",
            "stop",
        )
    )
    assert original.set_name == "original"
    assert MaskOpsConfig(ops=()).ops == OPS  # empty: the named set's operations
    assert MaskOpsConfig(ops=("dilate_3", "stop")).set_name == "custom"
    assert set(OPS) | set(ORIGINAL_OPS) == set(ALL_OPS) and ALL_OPS[-1] == "stop"


def test_lower_threshold_multiplies_and_rebuilds() -> None:
    prob = np.array([[0.30, 0.40, 0.46, 0.50, 0.90]], np.float32)
    state = MaskState(np.zeros((1, 5), bool), prob, threshold=0.5)
    once = apply_op("lower_threshold", state, CFG)
    assert once.threshold == 0.45
    assert once.mask.tolist() == [[False, False, True, True, True]]
    twice = apply_op("lower_threshold", once, CFG)
    assert twice.threshold == 0.405
    assert twice.mask.tolist() == [[False, False, True, True, True]]
    floor = MaskState(prob > 0.05, prob, threshold=0.05)
    assert apply_op("lower_threshold", floor, CFG).threshold == 0.05  # clipped at threshold_min
    assert apply_op("lower_threshold", MaskState(prob > 0.5, None), CFG).threshold == 0.5


def test_square_dilations() -> None:
    mask = np.zeros((9, 9), bool)
    mask[4, 4] = True
    assert int(_run("dilate_3", mask).sum()) == 9  # a 3x3 square, not the 3x3 ellipse's cross
    assert int(_run("dilate_5", mask).sum()) == 25
    assert int(_run("dilate", mask).sum()) == 5


def test_grow_region_grows_from_confident_pixels_only() -> None:
    prob = np.zeros((3, 8), np.float32)
    prob[1, 0:3] = (0.9, 0.5, 0.4)  # seeded run: grows through 0.5 and 0.4 (> 0.35)
    prob[1, 5:8] = (0.6, 0.5, 0.4)  # no pixel above 0.7: never grown
    mask = np.zeros((3, 8), bool)
    mask[0, 7] = True  # kept: growing only adds
    out = apply_op("grow_region", MaskState(mask, prob, threshold=0.5), CFG)
    expected = mask.copy()
    expected[1, 0:3] = True
    np.testing.assert_array_equal(out.mask, expected)
    assert out.threshold == 0.5
    assert not op_available("grow_region", MaskState(mask, None))


def test_every_known_op_is_pure_and_handles_missing_prob() -> None:
    rng = np.random.default_rng(5)
    prob = cv2.GaussianBlur(rng.random((48, 48)).astype(np.float32), (7, 7), 0)
    state = MaskState(prob > 0.5, prob)
    before = state.mask.copy()
    for name in ALL_OPS:
        first, second = apply_op(name, state, CFG), apply_op(name, state, CFG)
        np.testing.assert_array_equal(first.mask, second.mask, err_msg=name)
        np.testing.assert_array_equal(state.mask, before, err_msg=name)
        no_prob = MaskState(before, None)
        assert (apply_op(name, no_prob, CFG) is no_prob) == (name in (*PROB_OPS, "stop"))


def test_deferred_state_is_built_once_on_first_read() -> None:
    built = []
    prob = np.tile((np.arange(10, dtype=np.float32) + 0.5) / 10, (4, 1))

    def build() -> MaskState:
        built.append(1)
        return MaskState(prob > 0.5, prob, origin=("p",))

    state = MaskState.deferred(("p",), build)
    assert state.origin == ("p",) and state.threshold == 0.5 and not state.is_built
    assert built == []  # origin and threshold are known without building
    assert state.mask.sum() == 20 and state.prob is prob and state.is_built
    assert apply_op("dilate", state, CFG).origin == ("p", "dilate")
    assert built == [1]


def test_deferred_state_refuses_a_build_of_another_state() -> None:
    wrong = MaskState.deferred(
        ("p",), lambda: MaskState(np.zeros((2, 2), bool), None, origin=("q",))
    )
    with pytest.raises(ValueError, match=r"origin \('p',\).*built as origin \('q',\)"):
        _ = wrong.mask
