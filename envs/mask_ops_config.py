"""The post-processing action sets and the parameters of every mask operation.

Two named action sets (``MaskOpsConfig.action_set``):

- ``project`` (the default): :data:`OPS`, the project's ten operations, including threshold
  moves in both directions on the soft mask.
- ``original``: :data:`ORIGINAL_OPS`, the original team's seven actions: lower the threshold
  (x0.9), small dilation (3x3), medium dilation (5x5), closing, connectivity repair, region growing
  from high-confidence pixels, stop.

``MaskOpsConfig.ops`` may instead list any subset of :data:`ALL_OPS` (action index ``i`` is
``ops[i]``); the report then calls the set "custom".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, NoReturn

import cv2

from models.errors import UserError

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
"""The project's action set, in a fixed order (the default ``MaskOpsConfig.ops``)."""
ORIGINAL_OPS: tuple[str, ...] = (
    "lower_threshold",
    "dilate_3",
    "dilate_5",
    "close",
    "bridge_gaps",
    "grow_region",
    "stop",
)
"""The original team's seven post-processing actions (SEEDS.md), in their order."""
ALL_OPS: tuple[str, ...] = (*OPS[:-1], *(op for op in ORIGINAL_OPS if op not in OPS), "stop")
"""Every operation this module knows, in a fixed order (``stop`` last)."""
ACTION_SETS: dict[str, tuple[str, ...]] = {"project": OPS, "original": ORIGINAL_OPS}
"""Named action sets, by the name ``MaskOpsConfig.action_set`` takes."""
DEFAULT_ACTION_SET = "project"

THRESHOLD_OPS = ("threshold_down", "threshold_up", "lower_threshold")
"""Operations that move the threshold and rebuild the mask from the soft mask."""
PROB_OPS = (*THRESHOLD_OPS, "grow_region")
"""Operations that need a soft mask; without one they change nothing."""
KERNEL_SHAPES = {"ellipse": cv2.MORPH_ELLIPSE, "rect": cv2.MORPH_RECT, "cross": cv2.MORPH_CROSS}


@dataclass(frozen=True)
class MaskOpsConfig:
    """Parameters of the mask operations; validated on construction (raises ``UserError``)."""

    action_set: str = DEFAULT_ACTION_SET
    """Named action set (see :data:`ACTION_SETS`) whose operations ``ops`` defaults to."""
    ops: tuple[str, ...] = ()
    """Operations offered as actions, in action-index order: a subset of :data:`ALL_OPS`; empty:
    the operations of ``action_set``. Listing others makes the set "custom" (:attr:`set_name`)."""
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
    threshold_factor: float = 0.9
    """``lower_threshold`` multiplies the threshold by this (the original team's x0.9). (0, 1)."""
    grow_seed_threshold: float = 0.7
    """``grow_region`` seeds: soft-mask pixels above this (high confidence). (0, 1)."""
    grow_threshold: float = 0.35
    """``grow_region`` grows the seeds through 8-connected pixels above this. (0, 1), below
    ``grow_seed_threshold``."""

    def __post_init__(self) -> None:
        if self.action_set not in ACTION_SETS:
            _fail("action_set", self.action_set, f"must be one of {sorted(ACTION_SETS)}")
        # A YAML list is stored as a tuple (hashable); empty means the named set's operations.
        if isinstance(self.ops, list | tuple):
            object.__setattr__(self, "ops", tuple(self.ops) or ACTION_SETS[self.action_set])
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
        _check_float("threshold_factor", self.threshold_factor, 0.0, 1.0, low_open=True)
        if self.threshold_factor >= 1.0:
            _fail("threshold_factor", self.threshold_factor, "must be below 1 (it lowers)")
        for name in ("grow_seed_threshold", "grow_threshold"):
            _check_float(name, getattr(self, name), 0.0, 1.0, low_open=True)
        if self.grow_threshold >= self.grow_seed_threshold:
            _fail(
                "grow_threshold",
                self.grow_threshold,
                f"must be below grow_seed_threshold ({self.grow_seed_threshold})",
            )
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

    @property
    def set_name(self) -> str:
        """``action_set``, or "custom" when ``ops`` differs from that set's operations."""
        return self.action_set if self.ops == ACTION_SETS[self.action_set] else "custom"


def _fail(name: str, value: object, why: str) -> NoReturn:
    raise UserError(f"MaskOpsConfig.{name} = {value!r} is invalid: {why}; fix it in the config")


def _check_ops(ops: object) -> None:
    if not isinstance(ops, tuple) or not ops:
        _fail("ops", ops, f"must be a non-empty list of operation names from {list(ALL_OPS)}")
    unknown = [op for op in ops if op not in ALL_OPS]
    if unknown:
        _fail("ops", ops, f"unknown operation(s) {unknown}; choose from {list(ALL_OPS)}")
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
