"""``bridge_gaps`` handles all skeleton tips at once; it must equal the per-tip definition.

The reference below is the operation as its docstring defines it, one tip at a time (the code
the vectorised version replaced): trace each tip back along the skeleton, take the nearest
other-component pixel inside its cone (ties by row, then column), join shortest first, once
per pair of components.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from skimage.morphology import skeletonize

from envs.bridging import _NEIGHBOURS, _draw_bridge, _UnionFind, bridge_gaps
from envs.mask_ops import MaskOpsConfig


def _trace(skeleton: np.ndarray, tip: tuple[int, int], length: int) -> list[tuple[int, int]]:
    h, w = skeleton.shape
    visited, path = {tip}, [tip]
    for _ in range(length):
        r, c = path[-1]
        nxt = [
            (r + dr, c + dc)
            for dr, dc in _NEIGHBOURS
            if 0 <= r + dr < h and 0 <= c + dc < w and skeleton[r + dr, c + dc]
            if (r + dr, c + dc) not in visited
        ]
        if not nxt:
            break
        visited.update(nxt)
        path.append(max(nxt, key=lambda p: (p[0] - tip[0]) ** 2 + (p[1] - tip[1]) ** 2))
    return path


def _target(
    labels: np.ndarray, tip: tuple[int, int], direction: np.ndarray, config: MaskOpsConfig
) -> tuple[float, tuple[int, int]] | None:
    g = math.ceil(config.bridge_max_gap)
    r0, c0 = max(tip[0] - g, 0), max(tip[1] - g, 0)
    window = labels[r0 : tip[0] + g + 1, c0 : tip[1] + g + 1]
    rows, cols = np.nonzero((window != 0) & (window != labels[tip]))
    dr, dc = (rows + r0 - tip[0]).astype(np.float64), (cols + c0 - tip[1]).astype(np.float64)
    dist = np.hypot(dr, dc)
    cos = (dr * direction[0] + dc * direction[1]) / dist
    ok = (dist <= config.bridge_max_gap) & (
        cos >= math.cos(math.radians(config.bridge_max_angle_deg)) - 1e-9
    )
    if not ok.any():
        return None
    idx = np.flatnonzero(ok)
    best = idx[np.lexsort((cols[idx], rows[idx], dist[idx]))[0]]
    return float(dist[best]), (int(rows[best] + r0), int(cols[best] + c0))


def reference_bridge_gaps(mask: np.ndarray, config: MaskOpsConfig) -> np.ndarray:
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask.copy()
    skeleton = skeletonize(mask.copy())
    radius_map = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    sk = skeleton.astype(np.uint8)
    counts = cv2.filter2D(sk, -1, np.ones((3, 3), np.float32), borderType=cv2.BORDER_CONSTANT)
    candidates = []
    for tip in zip(*(a.tolist() for a in np.nonzero((sk == 1) & (counts == 2))), strict=True):
        path = _trace(skeleton, tip, config.bridge_trace_length)
        if len(path) < 2:
            continue
        vec = np.array([tip[0] - path[-1][0], tip[1] - path[-1][1]], dtype=np.float64)
        target = _target(labels, tip, vec / np.linalg.norm(vec), config)
        if target is not None:
            radius = max(float(radius_map[p]) for p in path)
            candidates.append((target[0], tip, target[1], radius))
    out = mask.astype(np.uint8)
    joined = _UnionFind(n)
    for _, (r, c), (tr, tc), radius in sorted(candidates):
        if joined.union(int(labels[r, c]), int(labels[tr, tc])):
            width = int(np.clip(2 * round(radius) - 1, 1, config.bridge_max_width))
            _draw_bridge(out, (r, c), (tr, tc), width)
    return out.astype(bool)


def _masks(seed: int) -> list[np.ndarray]:
    """Fragmented vessel-like masks: broken lines and specks, thin and thick, near the border."""
    rng = np.random.default_rng(seed)
    masks = []
    for thickness in (1, 2, 4):
        canvas = np.zeros((96, 96), np.uint8)
        for _ in range(8):
            p = rng.integers(-5, 101, 2)
            q = p + rng.integers(-40, 41, 2)
            cv2.line(canvas, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), 1, thickness)
        gaps = rng.random(canvas.shape) < 0.08  # break the lines into pieces
        masks.append(
            (canvas > 0) & ~cv2.dilate(gaps.astype(np.uint8), np.ones((2, 2))).astype(bool)
        )
    masks.append(rng.random((64, 80)) < 0.12)  # specks everywhere
    return masks


@pytest.mark.parametrize(
    "settings",
    [{}, {"bridge_max_gap": 7.5, "bridge_max_angle_deg": 60.0, "bridge_trace_length": 3}],
)
def test_bridge_gaps_equals_the_per_tip_definition(settings: dict) -> None:
    config = MaskOpsConfig(**settings)
    changed = 0
    for seed in range(12):
        for mask in _masks(seed):
            expected = reference_bridge_gaps(mask, config)
            np.testing.assert_array_equal(bridge_gaps(mask, config), expected)
            changed += int(not np.array_equal(expected, mask))
    assert changed >= 30  # the masks do have gaps to bridge
