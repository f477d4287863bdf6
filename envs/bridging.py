"""Connectivity repair: extend vessel tips across small gaps to the next vessel segment.

Used by the ``bridge_gaps`` operation of :mod:`envs.mask_ops`; parameters live in
:class:`~envs.mask_ops_config.MaskOpsConfig` (``bridge_*``).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from skimage.morphology import skeletonize

from envs.mask_ops_config import MaskOpsConfig

# Neighbour offsets in a fixed order, so skeleton tracing is deterministic.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def bridge_gaps(mask: np.ndarray, config: MaskOpsConfig) -> np.ndarray:
    """Extend vessel tips across small gaps to the next vessel segment (connectivity repair).

    For every tip (end pixel of the mask's skeleton) the direction is estimated by tracing
    ``bridge_trace_length`` px back along the skeleton. The tip is linked to the nearest pixel of
    another 8-connected component that lies within ``bridge_max_gap`` px and within
    ``bridge_max_angle_deg`` of that direction, by a straight line as wide as the vessel at the
    tip. Candidates are taken shortest first; a bridge is skipped when an earlier one already
    joined the same two components. Isolated skeleton pixels (specks) have no direction and are
    never a source, only a target.
    """
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 2:  # background plus at most one component: nothing to connect
        return mask.copy()
    # skimage's skeletonize needs a writable buffer; masks from Ray are read-only.
    skeleton = skeletonize(mask.copy())
    # Distance to the background = half the local vessel width (1 on a 1 px line).
    radius_map = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    candidates = []
    for tip in _skeleton_tips(skeleton):
        path = _trace(skeleton, tip, config.bridge_trace_length)
        if len(path) < 2:
            continue
        vec = np.array([tip[0] - path[-1][0], tip[1] - path[-1][1]], dtype=np.float64)
        target = _bridge_target(labels, tip, vec / np.linalg.norm(vec), config)
        if target is not None:
            # The vessel narrows at its very tip, so take its width along the traced piece.
            radius = max(float(radius_map[p]) for p in path)
            candidates.append((target[0], tip, target[1], radius))
    out = mask.astype(np.uint8)
    joined = _UnionFind(n)
    for _, (r, c), (tr, tc), radius in sorted(candidates):
        if not joined.union(int(labels[r, c]), int(labels[tr, tc])):
            continue
        thickness = int(np.clip(2 * round(radius) - 1, 1, config.bridge_max_width))
        _draw_bridge(out, (r, c), (tr, tc), thickness)
    return out.astype(bool)


def _draw_bridge(out: np.ndarray, p: tuple[int, int], q: tuple[int, int], width: int) -> None:
    """Set a ``width``-px wide band from p to q (both (row, col)) in ``out``, in place.

    A 1-px 8-connected line dilated by a ``width`` disk: exact width, unlike ``cv2.line``'s
    ``thickness``, which draws about two px wider than asked.
    """
    pad = width // 2
    h, w = out.shape
    r0, c0 = max(min(p[0], q[0]) - pad, 0), max(min(p[1], q[1]) - pad, 0)
    r1, c1 = min(max(p[0], q[0]) + pad + 1, h), min(max(p[1], q[1]) + pad + 1, w)
    band = np.zeros((r1 - r0, c1 - c0), np.uint8)
    cv2.line(band, (p[1] - c0, p[0] - r0), (q[1] - c0, q[0] - r0), 1, 1, cv2.LINE_8)
    if width > 1:
        band = cv2.dilate(band, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width)))
    out[r0:r1, c0:c1] |= band


def _skeleton_tips(skeleton: np.ndarray) -> list[tuple[int, int]]:
    """Skeleton pixels with exactly one skeleton neighbour, in row-major order."""
    sk = skeleton.astype(np.uint8)
    counts = cv2.filter2D(sk, -1, np.ones((3, 3), np.float32), borderType=cv2.BORDER_CONSTANT)
    rows, cols = np.nonzero((sk == 1) & (counts == 2))
    return list(zip(rows.tolist(), cols.tolist(), strict=True))


def _trace(skeleton: np.ndarray, tip: tuple[int, int], length: int) -> list[tuple[int, int]]:
    """Up to ``length + 1`` skeleton pixels starting at ``tip`` and walking away from it."""
    h, w = skeleton.shape
    visited = {tip}
    path = [tip]
    for _ in range(length):
        r, c = path[-1]
        nxt = [
            (r + dr, c + dc)
            for dr, dc in _NEIGHBOURS
            if 0 <= r + dr < h
            and 0 <= c + dc < w
            and skeleton[r + dr, c + dc]
            and (r + dr, c + dc) not in visited
        ]
        if not nxt:
            break
        visited.update(nxt)
        # On staircases and junctions follow the neighbour farthest from the tip, so the trace
        # keeps heading away from it.
        path.append(max(nxt, key=lambda p: (p[0] - tip[0]) ** 2 + (p[1] - tip[1]) ** 2))
    return path


def _bridge_target(
    labels: np.ndarray, tip: tuple[int, int], direction: np.ndarray, config: MaskOpsConfig
) -> tuple[float, tuple[int, int]] | None:
    """(distance, pixel) of the nearest other-component pixel inside the tip's cone, if any."""
    g = math.ceil(config.bridge_max_gap)
    r0, c0 = max(tip[0] - g, 0), max(tip[1] - g, 0)
    window = labels[r0 : tip[0] + g + 1, c0 : tip[1] + g + 1]
    own = labels[tip]
    rows, cols = np.nonzero((window != 0) & (window != own))
    if rows.size == 0:
        return None
    dr = (rows + r0 - tip[0]).astype(np.float64)
    dc = (cols + c0 - tip[1]).astype(np.float64)
    dist = np.hypot(dr, dc)
    cos = (dr * direction[0] + dc * direction[1]) / dist
    ok = (dist <= config.bridge_max_gap) & (
        cos >= math.cos(math.radians(config.bridge_max_angle_deg)) - 1e-9
    )
    if not ok.any():
        return None
    # lexsort: nearest first, ties broken by row then column, for determinism
    idx = np.flatnonzero(ok)
    best = idx[np.lexsort((cols[idx], rows[idx], dist[idx]))[0]]
    return float(dist[best]), (int(rows[best] + r0), int(cols[best] + c0))


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> bool:
        """Join the sets of a and b; False when they were already joined."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True
