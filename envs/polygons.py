"""Polygon <-> mask conversion, polygons in Sa2VA's form (flat ``[x1, y1, x2, y2, ...]`` lists).

One definition of "the ground-truth mask of a list of polygons" shared by the synthetic data
writer and the dataset loaders, so that a mask read back from JSON equals, pixel for pixel, the
mask the writer stored as PNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

MIN_POLYGON_POINTS = 3
"""Polygons with fewer points enclose no area; writers drop them and readers skip them."""


def rasterize_polygons(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Union of the individually filled polygons as a bool ``(height, width)`` mask.

    Each polygon is a flat ``[x1, y1, x2, y2, ...]`` list in pixel coordinates (values are
    rounded to int). Filling each polygon on its own (rather than all in one ``fillPoly`` call)
    matters: one call uses the even-odd rule, so overlapping polygons would cancel each other.
    Polygons with fewer than three points are skipped.
    """
    mask = np.zeros((height, width), np.uint8)
    for flat in polygons:
        points = np.rint(np.asarray(flat, dtype=np.float64)).astype(np.int32).reshape(-1, 2)
        if len(points) < MIN_POLYGON_POINTS:
            continue
        cv2.fillPoly(mask, [points], 1)
    return mask.astype(bool)


def mask_to_polygons(mask: np.ndarray) -> list[list[int]]:
    """External contours of a bool/uint8 mask as flat int ``[x1, y1, ...]`` lists (>= 3 points).

    Holes are not represented (Sa2VA's format has none), so
    ``rasterize_polygons(mask_to_polygons(m), *m.shape)`` is ``m`` with its holes filled and
    specks whose contour has fewer than three points removed.
    """
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    return [
        [int(v) for v in contour.reshape(-1)]
        for contour in contours
        if len(contour) >= MIN_POLYGON_POINTS
    ]
