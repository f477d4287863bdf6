"""Segmentation metrics on boolean masks: the one place they are defined.

Empty-mask conventions (a metric whose denominator is zero):
- ``dice`` and ``iou``: both masks empty -> 1.0 (perfect agreement on "nothing there").
- ``recall`` = TP / |GT|: GT empty -> 1.0 (nothing could be missed).
- ``precision`` = TP / |pred|: prediction empty -> 1.0 (nothing was wrongly claimed).
So an empty prediction on a non-empty GT scores dice 0, iou 0, recall 0, precision 1.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

METRIC_NAMES = ("dice", "iou", "recall", "precision")


class MaskMetrics(NamedTuple):
    """Dice, IoU, recall and precision of one prediction against one ground truth."""

    dice: float
    iou: float
    recall: float
    precision: float


def _check(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    if pred.dtype != np.bool_ or gt.dtype != np.bool_:
        raise ValueError(f"masks must be bool, got {pred.dtype} and {gt.dtype}")


def mask_metrics(pred: np.ndarray, gt: np.ndarray) -> MaskMetrics:
    """All four metrics of ``pred`` against ``gt`` (bool arrays of one shape)."""
    _check(pred, gt)
    tp = int(np.count_nonzero(pred & gt))
    n_pred = int(np.count_nonzero(pred))
    n_gt = int(np.count_nonzero(gt))
    union = n_pred + n_gt - tp
    return MaskMetrics(
        dice=1.0 if n_pred + n_gt == 0 else 2.0 * tp / (n_pred + n_gt),
        iou=1.0 if union == 0 else tp / union,
        recall=1.0 if n_gt == 0 else tp / n_gt,
        precision=1.0 if n_pred == 0 else tp / n_pred,
    )


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient 2|P∩G| / (|P| + |G|); 1.0 when both are empty."""
    return mask_metrics(pred, gt).dice


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union; 1.0 when both are empty."""
    return mask_metrics(pred, gt).iou


def recall(pred: np.ndarray, gt: np.ndarray) -> float:
    """Share of ground-truth pixels predicted; 1.0 when the ground truth is empty."""
    return mask_metrics(pred, gt).recall


def precision(pred: np.ndarray, gt: np.ndarray) -> float:
    """Share of predicted pixels that are ground truth; 1.0 when the prediction is empty."""
    return mask_metrics(pred, gt).precision
