"""Post-processing operations on a segmentation mask: the action set of the PostProcess env.

A :class:`MaskState` holds the current hard mask, the backend's soft mask (``prob``, or ``None``)
and the threshold that last built the mask from ``prob``. :func:`apply_op` maps one named
operation and a state to a new state; :data:`OPS` lists every operation in a fixed order, and
:class:`MaskOpsConfig` holds their parameters plus the subset (and order) an environment offers as
its discrete actions: action ``i`` is ``config.ops[i]``.

Rules a caller can rely on:

- Operations are pure and deterministic: they never modify the arrays of the state they get.
  Treat ``MaskState`` arrays as read-only.
- Morphological operations (everything except the threshold ops and ``stop``) act on ``mask``
  only; ``prob`` and ``threshold`` are carried over unchanged.
- Threshold ops move ``threshold`` by ``threshold_step`` (clipped to ``[threshold_min,
  threshold_max]``) and **rebuild** the mask as ``prob > threshold``, discarding any earlier
  morphology (also when clipping leaves the threshold where it was). This is the simplest rule
  that keeps the mask a pure function of (prob, threshold, ops applied since the last threshold
  op); an agent that wants both applies the threshold first.
- Without a soft mask (``prob is None``) threshold ops are no-ops and return the state object
  itself; :func:`op_available` tells the env so it can report it in ``info``.
- ``stop`` returns the state unchanged; ending the episode is the env's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, NoReturn

import cv2
import numpy as np
from skimage.morphology import skeletonize

from models.errors import UserError
from models.segmentation import Segmentation, check_mask_and_prob

OPS: tuple[str, ...] = (
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
"""Every operation, in a fixed order. ``MaskOpsConfig.ops`` picks a subset (default: all)."""

THRESHOLD_OPS = ("threshold_down", "threshold_up")
KERNEL_SHAPES = {"ellipse": cv2.MORPH_ELLIPSE, "rect": cv2.MORPH_RECT, "cross": cv2.MORPH_CROSS}

# Neighbour offsets in a fixed order, so skeleton tracing is deterministic.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@dataclass(frozen=True, eq=False)
class MaskState:
    """The mask being post-processed.

    Attributes:
        mask: bool HxW, the current hard mask.
        prob: float32 HxW soft mask in [0, 1], or ``None`` when the backend gave none.
        threshold: the threshold ``mask`` was last built with from ``prob`` (``prob > threshold``);
            nominal (0.5 by default) when ``prob`` is ``None``.
    """

    mask: np.ndarray
    prob: np.ndarray | None
    threshold: float = 0.5

    def __post_init__(self) -> None:
        check_mask_and_prob(self.mask, self.prob)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    @classmethod
    def from_segmentation(cls, seg: Segmentation, threshold: float = 0.5) -> MaskState:
        """Start from a backend answer: its hard mask as is, its soft mask for threshold ops."""
        return cls(mask=seg.mask, prob=seg.prob, threshold=threshold)


@dataclass(frozen=True)
class MaskOpsConfig:
    """Parameters of the mask operations; validated on construction (raises ``UserError``)."""

    ops: tuple[str, ...] = OPS
    """Operations offered as actions, in action-index order; a non-empty subset of ``OPS``."""
    kernel_shape: str = "ellipse"
    """Structuring element of the morphological ops: "ellipse" (a cross at 3x3), "rect", "cross"."""
    dilate_kernel: int = 3
    """Side of the dilation kernel in px; odd, 3..31."""
    erode_kernel: int = 3
    """Side of the erosion kernel in px; odd, 3..31."""
    open_kernel: int = 3
    """Side of the opening kernel in px; odd, 3..31 (large values wipe out thin vessels)."""
    close_kernel: int = 5
    """Side of the closing kernel in px; odd, 3..31."""
    fill_holes_max_area: int = 64
    """Holes (background enclosed by the mask, 4-connected) up to this many px are filled; larger
    ones are kept, since loops of vessels enclose real background. 1..1_000_000."""
    min_component_area: int = 20
    """``remove_small`` drops 8-connected components with fewer px than this. 1..1_000_000."""
    bridge_max_gap: float = 12.0
    """``bridge_gaps`` links a skeleton tip to another component at most this far away (px,
    Euclidean, tip to the nearest pixel of the other component). 1..100."""
    bridge_max_angle_deg: float = 30.0
    """...and only if that pixel lies within this angle of the tip's direction. 1..90."""
    bridge_trace_length: int = 6
    """Skeleton px traced back from a tip to estimate its direction. 1..50."""
    bridge_max_width: int = 7
    """Upper bound on the bridge's width; the width is the vessel's local width at the tip
    (2 * round(distance to background) - 1, always odd). Odd, 1..31."""
    threshold_step: float = 0.1
    """How far ``threshold_down``/``threshold_up`` move the threshold. (0, 0.5]."""
    threshold_min: float = 0.05
    """Lowest threshold reachable. [0, 1), below ``threshold_max``."""
    threshold_max: float = 0.95
    """Highest threshold reachable. (0, 1], above ``threshold_min``."""

    def __post_init__(self) -> None:
        if isinstance(self.ops, list):  # as parsed from YAML; stored as a tuple (hashable)
            object.__setattr__(self, "ops", tuple(self.ops))
        _check_ops(self.ops)
        if self.kernel_shape not in KERNEL_SHAPES:
            _fail("kernel_shape", self.kernel_shape, f"must be one of {sorted(KERNEL_SHAPES)}")
        for name in ("dilate_kernel", "erode_kernel", "open_kernel", "close_kernel"):
            _check_int(name, getattr(self, name), 3, 31, odd=True)
        _check_int("fill_holes_max_area", self.fill_holes_max_area, 1, 1_000_000)
        _check_int("min_component_area", self.min_component_area, 1, 1_000_000)
        _check_float("bridge_max_gap", self.bridge_max_gap, 1.0, 100.0)
        _check_float("bridge_max_angle_deg", self.bridge_max_angle_deg, 1.0, 90.0)
        _check_int("bridge_trace_length", self.bridge_trace_length, 1, 50)
        _check_int("bridge_max_width", self.bridge_max_width, 1, 31, odd=True)
        _check_float("threshold_step", self.threshold_step, 0.0, 0.5, low_open=True)
        _check_float("threshold_min", self.threshold_min, 0.0, 1.0)
        _check_float("threshold_max", self.threshold_max, 0.0, 1.0)
        if self.threshold_min >= self.threshold_max:
            _fail(
                "threshold_min",
                self.threshold_min,
                f"must be below threshold_max ({self.threshold_max})",
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MaskOpsConfig:
        """Build from a parsed YAML mapping; unknown keys are rejected by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"MaskOpsConfig: unknown key(s) {unknown}; allowed keys are {sorted(known)}"
            )
        return cls(**values)


def _fail(name: str, value: object, why: str) -> NoReturn:
    raise UserError(f"MaskOpsConfig.{name} = {value!r} is invalid: {why}; fix it in the config")


def _check_ops(ops: object) -> None:
    if not isinstance(ops, tuple) or not ops:
        _fail("ops", ops, f"must be a non-empty list of operation names from {list(OPS)}")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        _fail("ops", ops, f"unknown operation(s) {unknown}; choose from {list(OPS)}")
    if len(set(ops)) != len(ops):
        _fail("ops", ops, "lists an operation twice; each may appear once")


def _check_int(name: str, value: object, low: int, high: int, odd: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if not ok or (odd and isinstance(value, int) and value % 2 == 0):
        kind = "an odd integer" if odd else "an integer"
        _fail(name, value, f"must be {kind} in [{low}, {high}]")


def _check_float(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        above_low = value > low if low_open else value >= low
        if above_low and value <= high:
            return
    bracket = "(" if low_open else "["
    _fail(name, value, f"must be a number in {bracket}{low}, {high}]")


def op_available(name: str, state: MaskState) -> bool:
    """Whether ``name`` can change anything in principle: threshold ops need a soft mask."""
    _check_name(name)
    return name not in THRESHOLD_OPS or state.prob is not None


def apply_action(index: int, state: MaskState, config: MaskOpsConfig) -> MaskState:
    """Apply action ``index``, i.e. operation ``config.ops[index]``."""
    if not 0 <= index < len(config.ops):
        raise ValueError(f"action {index} out of range: {len(config.ops)} ops {config.ops}")
    return apply_op(config.ops[index], state, config)


def apply_op(name: str, state: MaskState, config: MaskOpsConfig) -> MaskState:
    """Apply operation ``name`` (one of ``OPS``) to ``state``; returns a new state.

    Returns ``state`` itself for ``stop`` and for threshold ops when ``state.prob`` is ``None``.
    """
    _check_name(name)
    if name == "stop":
        return state
    if name in THRESHOLD_OPS:
        return _rethreshold(state, config, up=name == "threshold_up")
    new_mask = _MORPH_OPS[name](state.mask, config)
    return MaskState(mask=new_mask, prob=state.prob, threshold=state.threshold)


def _check_name(name: str) -> None:
    if name not in OPS:
        raise ValueError(f"unknown mask operation {name!r}; known: {OPS}")


def _rethreshold(state: MaskState, config: MaskOpsConfig, up: bool) -> MaskState:
    if state.prob is None:
        return state
    step = config.threshold_step if up else -config.threshold_step
    # Rounding keeps repeated steps exact (0.5 - 0.1 - 0.1 == 0.3), so equal action sequences
    # give bit-equal thresholds and tests can name the expected value.
    new_t = round(min(config.threshold_max, max(config.threshold_min, state.threshold + step)), 9)
    return MaskState(mask=state.prob > new_t, prob=state.prob, threshold=new_t)


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
    _, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    border = np.unique(
        np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    )  # regions touching the image border are not enclosed
    small = stats[:, cv2.CC_STAT_AREA] <= config.fill_holes_max_area
    small[0] = False  # label 0 is the mask itself
    small[border] = False
    if not small.any():
        return mask.copy()
    return mask | small[labels]


def remove_small(mask: np.ndarray, config: MaskOpsConfig) -> np.ndarray:
    """Drop 8-connected components with fewer than ``config.min_component_area`` px."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= config.min_component_area
    keep[0] = False
    return keep[labels]


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


_MORPH_OPS = {
    "dilate": dilate,
    "erode": erode,
    "open": open_,
    "close": close,
    "fill_holes": fill_holes,
    "remove_small": remove_small,
    "bridge_gaps": bridge_gaps,
}
