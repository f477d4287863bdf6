"""Morphological mask operations (they act on the hard mask only) and region growing.

Every function takes the current mask (bool HxW, never modified) and the
:class:`~envs.mask_ops_config.MaskOpsConfig`, and returns a new bool mask.
"""

from __future__ import annotations

import cv2
import numpy as np

from envs.mask_ops_config import KERNEL_SHAPES, MaskOpsConfig


def component_areas(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """The connected components of ``mask`` (bool HxW): labels (0: background) and the area of
    every label. As ``cv2.connectedComponentsWithStats``'s labels and areas, at a fraction of
    its cost (its other statistics are what make it slow)."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=connectivity)
    return labels, np.bincount(labels.ravel(), minlength=n)


def _kernel(config: MaskOpsConfig, size: int) -> np.ndarray:
    return cv2.getStructuringElement(KERNEL_SHAPES[config.kernel_shape], (size, size))


def _morph(mask: np.ndarray, op: int, kernel: np.ndarray) -> np.ndarray:
    # OpenCV's default border value is neutral for each op (dilate: -inf, erode: +inf), so the
    # image border neither grows nor eats the mask.
    out = cv2.morphologyEx(mask.astype(np.uint8), op, kernel)
    return out.astype(bool)


def dilate(mask: np.ndarray, config: MaskOpsConfig) -> np.ndarray:
    """Grow the mask by ``config.dilate_kernel``."""
    return _morph(mask, cv2.MORPH_DILATE, _kernel(config, config.dilate_kernel))


def erode(mask: np.ndarray, config: MaskOpsConfig) -> np.ndarray:
    """Shrink the mask by ``config.erode_kernel``."""
    return _morph(mask, cv2.MORPH_ERODE, _kernel(config, config.erode_kernel))


def open_(mask: np.ndarray, config: MaskOpsConfig) -> np.ndarray:
    """Erode then dilate: removes specks and spurs thinner than ``config.open_kernel``."""
    return _morph(mask, cv2.MORPH_OPEN, _kernel(config, config.open_kernel))


def close(mask: np.ndarray, config: MaskOpsConfig) -> np.ndarray:
    """Dilate then erode: closes gaps and notches narrower than ``config.close_kernel``."""
    return _morph(mask, cv2.MORPH_CLOSE, _kernel(config, config.close_kernel))


def fill_holes(mask: np.ndarray, config: MaskOpsConfig) -> np.ndarray:
    """Fill background regions enclosed by the mask of at most ``config.fill_holes_max_area`` px.

    Background is 4-connected (the dual of the mask's 8-connectivity), so a diagonal gap in a
    vessel wall does not make its inside count as enclosed.
    """
    labels, areas = component_areas(~mask, connectivity=4)
    border = np.unique(
        np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    )  # regions touching the image border are not enclosed
    small = areas <= config.fill_holes_max_area
    small[0] = False  # label 0 is the mask itself
    small[border] = False
    if not small.any():
        return mask.copy()
    return mask | small[labels]


def remove_small(mask: np.ndarray, config: MaskOpsConfig) -> np.ndarray:
    """Drop 8-connected components with fewer than ``config.min_component_area`` px."""
    labels, areas = component_areas(mask, connectivity=8)
    keep = areas >= config.min_component_area
    keep[0] = False
    return keep[labels]


def dilate_square(mask: np.ndarray, size: int) -> np.ndarray:
    """Grow the mask by a ``size`` x ``size`` square (the original team's 3x3 and 5x5 dilations)."""
    return _morph(mask, cv2.MORPH_DILATE, np.ones((size, size), np.uint8))


def grow_region(mask: np.ndarray, prob: np.ndarray, config: MaskOpsConfig) -> np.ndarray:
    """The mask plus every region grown from high-confidence pixels.

    Seeds are soft-mask pixels above ``config.grow_seed_threshold``; each grows through the
    8-connected pixels above ``config.grow_threshold`` (hysteresis thresholding). The result is
    the union with the current mask, so growing never removes what earlier operations added.
    """
    n, labels = cv2.connectedComponents(
        (prob > config.grow_threshold).astype(np.uint8), connectivity=8
    )
    if n <= 1:
        return mask.copy()
    seeded = np.zeros(n, bool)
    seeded[np.unique(labels[prob > config.grow_seed_threshold])] = True
    seeded[0] = False  # label 0 is below the grow threshold
    return mask | seeded[labels]
