"""Connectivity repair: extend vessel tips across small gaps to the next vessel segment.

Used by the ``bridge_gaps`` operation of :mod:`envs.mask_ops`; parameters live in
:class:`~envs.mask_ops_config.MaskOpsConfig` (``bridge_*``).
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
from skimage.morphology import skeletonize

from envs.mask_ops_config import MaskOpsConfig

# Neighbour offsets in a fixed order, so skeleton tracing is deterministic.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_OFFSETS = np.array(_NEIGHBOURS, np.intp)


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
    tips = _skeleton_tips(skeleton)
    candidates = []
    for i, dist, target, radius in _bridge_targets(labels, skeleton, radius_map, tips, config):
        candidates.append((dist, (int(tips[i, 0]), int(tips[i, 1])), target, radius))
    out = mask.astype(np.uint8)
    joined = _UnionFind(n)
    for _, (r, c), (tr, tc), radius in sorted(candidates):
        if not joined.union(int(labels[r, c]), int(labels[tr, tc])):
            continue
        thickness = min(max(2 * round(radius) - 1, 1), config.bridge_max_width)
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


def _skeleton_tips(skeleton: np.ndarray) -> np.ndarray:
    """(row, col) of the skeleton pixels with exactly one skeleton neighbour, row-major."""
    sk = skeleton.astype(np.uint8)
    counts = cv2.filter2D(sk, -1, np.ones((3, 3), np.float32), borderType=cv2.BORDER_CONSTANT)
    return np.argwhere((sk == 1) & (counts == 2))


@functools.lru_cache(maxsize=8)
def _disc_offsets(max_gap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dr, dc, dist) of every pixel offset with 0 < distance <= ``max_gap``, nearest first,
    ties by row then column offset: around one tip, the order (distance, row, column)."""
    g = math.ceil(max_gap)
    dr, dc = (a.ravel() for a in np.mgrid[-g : g + 1, -g : g + 1])
    dist = np.hypot(dr.astype(np.float64), dc.astype(np.float64))
    keep = (dist > 0) & (dist <= max_gap)
    order = np.lexsort((dc[keep], dr[keep], dist[keep]))
    return dr[keep][order], dc[keep][order], dist[keep][order]


def _bridge_targets(
    labels: np.ndarray,
    skeleton: np.ndarray,
    radius_map: np.ndarray,
    tips: np.ndarray,
    config: MaskOpsConfig,
) -> list[tuple[int, float, tuple[int, int], float]]:
    """(tip index, distance, pixel, radius) for every tip with a pixel of another component
    inside its cone: the nearest such pixel (ties: row, then column), and the largest vessel
    radius along the tip's trace (the vessel narrows at its very tip).

    All tips are handled at once: the labels on the disc of offsets around each tip
    (:func:`_disc_offsets`), then one trace per tip with another component inside the disc at
    all (:func:`_trace`), then the cone.
    """
    dr, dc, dist = _disc_offsets(config.bridge_max_gap)
    g = math.ceil(config.bridge_max_gap)
    padded = np.pad(labels, g)  # label 0 (background) outside the image: never a target
    around = padded[tips[:, :1] + g + dr, tips[:, 1:] + g + dc]
    other = (around != 0) & (around != labels[tips[:, 0], tips[:, 1]][:, None])
    near = np.flatnonzero(other.any(axis=1))
    ends, radius = _trace(skeleton, radius_map, tips[near], config.bridge_trace_length)
    traced = (ends != 0).any(axis=1)  # specks (no skeleton neighbour to walk to) have no direction
    near, ends, radius = near[traced], ends[traced], radius[traced]
    vec = -ends.astype(np.float64)  # from the trace's far end to the tip
    direction = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    cos = (dr * direction[:, :1] + dc * direction[:, 1:]) / dist
    ok = other[near] & (cos >= math.cos(math.radians(config.bridge_max_angle_deg)) - 1e-9)
    hit = np.flatnonzero(ok.any(axis=1))
    best = ok[hit].argmax(axis=1)  # the first in (distance, row, column) order
    tip_index = near[hit]
    target_r = (tips[tip_index, 0] + dr[best]).tolist()
    target_c = (tips[tip_index, 1] + dc[best]).tolist()
    return list(
        zip(
            tip_index.tolist(),
            dist[best].tolist(),
            zip(target_r, target_c, strict=True),
            radius[hit].tolist(),
            strict=True,
        )
    )


def _trace(
    skeleton: np.ndarray, radius_map: np.ndarray, tips: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Walk up to ``length`` skeleton pixels away from every tip at once; returns each walk's
    last pixel as an offset from its tip ((0, 0): the tip had nowhere to go) and the largest
    ``radius_map`` value on the walk, tip included.

    Each step goes to an unvisited skeleton neighbour (all of them become visited); on
    staircases and junctions to the one farthest from the tip (ties: the first in
    :data:`_NEIGHBOURS` order), so the walk keeps heading away from it.
    """
    n, pad = len(tips), length + 1
    window = 2 * pad + 1  # every pixel a walk can reach, around its tip
    sk = np.pad(skeleton.astype(bool), pad)
    visited = np.zeros((n, window, window), bool)
    visited[:, pad, pad] = True
    here = np.zeros((n, 2), np.intp)
    radius = radius_map[tips[:, 0], tips[:, 1]].astype(np.float64)
    walking = np.ones(n, bool)
    rows = np.arange(n)[:, None]
    for _ in range(length):
        step = here[:, None, :] + _OFFSETS  # (n, 8, 2), offsets from the tip
        at = tips[:, None, :] + step + pad
        free = sk[at[..., 0], at[..., 1]] & ~visited[rows, step[..., 0] + pad, step[..., 1] + pad]
        free &= walking[:, None]
        moved = free.any(axis=1)
        if not moved.any():
            break
        visited[np.nonzero(free)[0], *(step[free] + pad).T] = True
        far = np.where(free, (step**2).sum(axis=2), -1).argmax(axis=1)
        here[moved] = step[moved, far[moved]]
        pixel = tips[moved] + here[moved]
        radius[moved] = np.maximum(radius[moved], radius_map[pixel[:, 0], pixel[:, 1]])
        walking &= moved
    return here, radius


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
