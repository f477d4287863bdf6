"""Exact values, bounds and the no-ground-truth signature of the observation features."""

from __future__ import annotations

import inspect
import math

import cv2
import numpy as np
import pytest

from envs.features import (
    FEATURE_NAMES,
    FEATURES,
    IMAGE_FEATURE_DIM,
    MASK_FEATURE_DIM,
    OBSERVATION_DIM,
    image_features,
    mask_features,
    observation,
    observation_space,
)

IDX = {name: i for i, name in enumerate(FEATURE_NAMES)}
MASK_IDX = {name: i - IMAGE_FEATURE_DIM for name, i in IDX.items() if i >= IMAGE_FEATURE_DIM}


def test_feature_table() -> None:
    assert (IMAGE_FEATURE_DIM, MASK_FEATURE_DIM, OBSERVATION_DIM) == (16, 7, 24)
    assert len(set(FEATURE_NAMES)) == OBSERVATION_DIM
    assert all(f.meaning and f.low < f.high for f in FEATURES)
    space = observation_space()
    assert space.shape == (24,) and space.dtype == np.float32
    np.testing.assert_array_equal(space.low, [f.low for f in FEATURES])
    np.testing.assert_array_equal(space.high, [f.high for f in FEATURES])


def test_signatures_take_no_ground_truth() -> None:
    assert list(inspect.signature(observation).parameters) == [
        "image",
        "mask",
        "prob",
        "step",
        "max_steps",
        "image_feats",
        "mask_feats",
    ]
    assert list(inspect.signature(mask_features).parameters) == ["mask", "prob"]
    assert list(inspect.signature(image_features).parameters) == ["image"]


# --- image features ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 100, 255])
def test_constant_image(value: int) -> None:
    feats = image_features(np.full((64, 64, 3), value, np.uint8))
    expected = np.zeros(16, np.float32)
    level = np.float32(value / 255)
    expected[[IDX["img_mean"], *range(IDX["img_p05"], IDX["img_p95"] + 1)]] = level
    np.testing.assert_array_equal(feats, expected)


def test_half_black_half_white() -> None:
    img = np.zeros((64, 64), np.uint8)
    img[:, 32:] = 255
    f = image_features(img)
    assert f[IDX["img_mean"]] == 0.5 and f[IDX["img_std"]] == 0.5
    assert f[IDX["img_skew"]] == 0.0
    # Two equally likely values: excess kurtosis -2.
    assert f[IDX["img_kurtosis"]] == pytest.approx(math.tanh(-2 / 5), abs=1e-7)
    np.testing.assert_array_equal(f[IDX["img_p05"] : IDX["img_p95"] + 1], [0, 0, 0.5, 1, 1])
    # The step edge: Sobel magnitude 4 (normalised 1/sqrt(2)) on 2 of 64 columns.
    assert f[IDX["grad_mean"]] == pytest.approx(2 / 64 / math.sqrt(2), abs=1e-7)
    # Laplacian +1 and -1 on those columns, 0 elsewhere: variance 2/64, scaled by 1/4.
    assert f[IDX["laplacian_std"]] == pytest.approx(math.sqrt(2 / 64) / 4, abs=1e-7)
    assert f[IDX["dark_ridge"]] == 0.0  # a step is no ridge
    assert f[IDX["edge_density"]] == 1 / 64  # Canny marks one column
    assert f[IDX["img_entropy"]] == 1 / 8  # one bit


def test_dark_ridge_measures_thin_dark_lines() -> None:
    img = np.full((64, 64), 255, np.uint8)
    img[30:33] = 0  # a 3 px dark "vessel"
    assert image_features(img)[IDX["dark_ridge"]] == 3 / 64
    img[30:33] = 255
    img[:, :32] = 0  # a dark half-plane is far wider than the 15 px kernel: no ridge
    assert image_features(img)[IDX["dark_ridge"]] == 0.0


def test_large_images_are_downscaled_first() -> None:
    rng = np.random.default_rng(0)
    small = cv2.GaussianBlur(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), (5, 5), 0)
    big = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)  # INTER_AREA undoes this exactly
    np.testing.assert_array_equal(image_features(big), image_features(small))


def test_rgb_and_grey_agree() -> None:
    grey = np.random.default_rng(1).integers(0, 256, (32, 48), dtype=np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(image_features(rgb), image_features(grey))


def test_bad_image_rejected() -> None:
    with pytest.raises(ValueError, match="uint8"):
        image_features(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        image_features(np.zeros((8, 8, 4), np.uint8))


# --- mask features -------------------------------------------------------------------------


def _two_lines() -> np.ndarray:
    mask = np.zeros((40, 40), bool)
    mask[5, 0:30] = True  # 30 px
    mask[20, 0:10] = True  # 10 px
    return mask


def test_mask_features_two_components() -> None:
    mask = _two_lines()
    prob = np.where(mask, 0.75, 0.25).astype(np.float32)
    f = mask_features(mask, prob)
    assert f[MASK_IDX["mask_area"]] == np.float32(40 / 1600)
    assert f[MASK_IDX["mask_components"]] == np.float32(math.log(3) / math.log(1001))
    assert f[MASK_IDX["mask_largest_share"]] == 0.75
    assert f[MASK_IDX["mask_skeleton"]] == np.float32(40 / (8 * 80))  # 1 px lines are skeletons
    assert f[MASK_IDX["prob_inside"]] == 0.75
    assert f[MASK_IDX["prob_outside"]] == 0.25
    assert f[MASK_IDX["has_prob"]] == 1.0


def test_mask_features_without_prob() -> None:
    f = mask_features(_two_lines(), None)
    assert f[MASK_IDX["prob_inside"]] == 0.0
    assert f[MASK_IDX["prob_outside"]] == 0.0
    assert f[MASK_IDX["has_prob"]] == 0.0


def test_empty_and_full_masks() -> None:
    prob = np.full((16, 16), 0.5, np.float32)
    empty = mask_features(np.zeros((16, 16), bool), prob)
    np.testing.assert_array_equal(empty, [0, 0, 0, 0, 0, 0.5, 1])
    full = mask_features(np.ones((16, 16), bool), prob)
    assert full[MASK_IDX["mask_area"]] == 1.0
    assert full[MASK_IDX["mask_largest_share"]] == 1.0
    assert full[MASK_IDX["prob_inside"]] == 0.5
    assert full[MASK_IDX["prob_outside"]] == 0.0


def test_mask_features_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="bool"):
        mask_features(np.zeros((4, 4), np.uint8), None)
    with pytest.raises(ValueError, match="shape"):
        mask_features(np.zeros((4, 4), bool), np.zeros((4, 5), np.float32))


# --- the whole observation -----------------------------------------------------------------


def test_progress_and_caching() -> None:
    img = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), bool)
    obs = observation(img, mask, None, 2, 3)
    assert obs.dtype == np.float32 and obs.shape == (24,)
    assert obs[IDX["progress"]] == np.float32(2 / 3)
    cached = observation(img, mask, None, 2, 3, image_feats=image_features(img))
    np.testing.assert_array_equal(obs, cached)
    assert observation(img, mask, None, 0, 3)[IDX["progress"]] == 0.0
    assert observation(img, mask, None, 3, 3)[IDX["progress"]] == 1.0
    for step, max_steps in ((4, 3), (-1, 3), (0, 0)):
        with pytest.raises(ValueError, match="step"):
            observation(img, mask, None, step, max_steps)


def _adversarial_images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:128, 0:128]
    checker = (((yy + xx) % 2) * 255).astype(np.uint8)
    return [
        np.zeros((128, 128, 3), np.uint8),
        np.full((128, 128, 3), 255, np.uint8),
        np.repeat(checker[:, :, None], 3, axis=2),
        rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
        (rng.random((128, 128, 3)) < 0.5).astype(np.uint8) * 255,
        np.where(rng.random((128, 128, 3)) < 0.001, 255, 0).astype(np.uint8),  # rare spikes
        rng.integers(0, 256, (512, 512, 3), dtype=np.uint8),
        rng.integers(0, 256, (3, 700, 3), dtype=np.uint8),  # extreme aspect ratio
    ]


def _adversarial_masks(shape: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    rng = np.random.default_rng(8)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    checker = (yy + xx) % 2 == 1
    noise = rng.random(shape) < 0.5
    return [
        (np.zeros(shape, bool), None),
        (np.ones(shape, bool), np.ones(shape, np.float32)),
        (checker, rng.random(shape).astype(np.float32)),  # a component per pixel
        (noise, np.zeros(shape, np.float32)),
        (noise, None),
    ]


def test_observations_inside_space_and_finite() -> None:
    space = observation_space()
    for img in _adversarial_images():
        feats = image_features(img)
        assert np.isfinite(feats).all()
        for mask, prob in _adversarial_masks(img.shape[:2]):
            for step in (0, 3):
                obs = observation(img, mask, prob, step, 3, image_feats=feats)
                assert np.isfinite(obs).all()
                assert space.contains(obs), dict(zip(FEATURE_NAMES, obs.tolist(), strict=True))


def test_saturating_features_reach_their_bound() -> None:
    yy, xx = np.mgrid[0:128, 0:128]
    checker = (yy + xx) % 2 == 1  # 8192 diagonal-connected pixels: one component
    isolated = (yy % 2 == 0) & (xx % 2 == 0)  # 4096 separate specks
    assert mask_features(checker, None)[MASK_IDX["mask_components"]] == np.float32(
        math.log(2) / math.log(1001)
    )
    assert mask_features(isolated, None)[MASK_IDX["mask_components"]] == 1.0
