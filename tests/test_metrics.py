"""Exact-number tests of the segmentation metrics, including the empty-mask conventions."""

import numpy as np
import pytest

from models.metrics import MaskMetrics, dice, iou, mask_metrics, precision, recall


def _masks() -> tuple[np.ndarray, np.ndarray]:
    # 4x4 canvas: GT has 6 pixels, prediction 4 pixels, 3 of them on GT.
    gt = np.zeros((4, 4), bool)
    gt[0, :3] = True
    gt[1, :3] = True
    pred = np.zeros((4, 4), bool)
    pred[0, 1:4] = True
    pred[1, 2] = True
    return pred, gt


def test_hand_made_case_exact() -> None:
    pred, gt = _masks()
    # TP = 3 ((0,1), (0,2), (1,2)); |P| = 4; |G| = 6; union = 7.
    assert mask_metrics(pred, gt) == MaskMetrics(dice=0.6, iou=3 / 7, recall=0.5, precision=0.75)
    assert dice(pred, gt) == 0.6
    assert iou(pred, gt) == 3 / 7
    assert recall(pred, gt) == 0.5
    assert precision(pred, gt) == 0.75


def test_identical_and_disjoint() -> None:
    _, gt = _masks()
    assert mask_metrics(gt, gt) == MaskMetrics(1.0, 1.0, 1.0, 1.0)
    assert mask_metrics(~gt, gt) == MaskMetrics(0.0, 0.0, 0.0, 0.0)


def test_empty_conventions() -> None:
    empty = np.zeros((3, 3), bool)
    some = empty.copy()
    some[1, 1] = True
    assert mask_metrics(empty, empty) == MaskMetrics(1.0, 1.0, 1.0, 1.0)
    # Empty prediction on a non-empty GT: nothing found, nothing wrongly claimed.
    assert mask_metrics(empty, some) == MaskMetrics(0.0, 0.0, 0.0, 1.0)
    # Non-empty prediction on an empty GT: nothing to miss, everything claimed is wrong.
    assert mask_metrics(some, empty) == MaskMetrics(0.0, 0.0, 1.0, 0.0)


def test_dice_iou_relation() -> None:
    rng = np.random.default_rng(0)
    pred = rng.random((32, 32)) > 0.5
    gt = rng.random((32, 32)) > 0.4
    m = mask_metrics(pred, gt)
    assert m.dice == pytest.approx(2 * m.iou / (1 + m.iou))


def test_rejects_shape_and_dtype_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        mask_metrics(np.zeros((2, 2), bool), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="bool"):
        mask_metrics(np.zeros((2, 2), np.uint8), np.zeros((2, 2), bool))
