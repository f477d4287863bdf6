"""Video-level content of the synthetic angiograms: vessel tree, catheter, patient background.

What the frames of one video share (see :mod:`envs.synthetic` for how frames are rendered from
it). Every draw comes from the ``numpy.random.Generator`` seeded ``(seed, video, VIDEO_STREAM)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

_MAX_BRANCHES = 90
STEP = 3.0
"""px between consecutive centre-line points."""
# Random streams: (seed, video, VIDEO_STREAM) for what a video shares,
# (seed, video, FRAME_STREAM, frame) for each frame; distinct lengths/tags never collide.
VIDEO_STREAM, FRAME_STREAM = 0, 1


@dataclass(frozen=True)
class Tube:
    """A centre line ``points`` (N, 2) as (x, y) with a width ``widths`` (N,) at each point."""

    points: np.ndarray
    widths: np.ndarray


@dataclass(frozen=True)
class Video:
    """What the frames of one video share."""

    tree: list[Tube]
    catheter: Tube | None
    background: np.ndarray  # float32 HxW in (0, 1]
    centre: np.ndarray  # (2,) heart centre, the pivot of the cardiac motion
    waves: np.ndarray  # (4, 4): per wave kx, ky, phase, amplitude of the smooth deformation
    attenuation: float  # typical contrast (per px of vessel thickness) of this video
    noise: float  # typical noise level of this video


def pt(p: np.ndarray) -> tuple[int, int]:
    """An (x, y) point rounded to the pixel OpenCV drawing functions take."""
    return round(float(p[0])), round(float(p[1]))


def _smooth_field(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Zero-mean, unit-ish random field varying on a scale of ``size / cells`` pixels."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Patient background: vignetting, heart shadow, rib-like bands, texture at three scales."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    image = np.full((size, size), rng.uniform(0.55, 0.72), np.float32)
    # Image-intensifier vignetting: darker towards the corners.
    image -= rng.uniform(0.1, 0.25) * (xx**2 + yy**2)
    # Heart silhouette: a large soft-edged darker ellipse.
    cx, cy = rng.uniform(-0.2, 0.2, 2)
    ax, ay = rng.uniform(0.25, 0.45, 2)
    inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2
    image -= rng.uniform(0.04, 0.12) / (1.0 + np.exp((inside - 1.0) * rng.uniform(4, 10)))
    # Rib-like bands: wide, faint, gently curved dark ridges (a large-scale clutter source).
    for _ in range(rng.integers(2, 6)):
        tilt, offset, bend = rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.5), rng.uniform(-1, 1)
        dist = yy - (offset + tilt * xx + bend * xx**2)
        half_width = rng.uniform(0.02, 0.05)
        image -= rng.uniform(0.015, 0.04) * np.exp(-((dist / half_width) ** 2))
    image += rng.uniform(0.03, 0.07) * _smooth_field(rng, 4, size)
    image += rng.uniform(0.01, 0.025) * _smooth_field(rng, 24, size)
    image += rng.uniform(0.004, 0.012) * _smooth_field(rng, 96, size)
    return np.clip(image, 0.12, 1.0)


class _Sprout(NamedTuple):
    """A vessel waiting to grow: where, in which direction, how wide, off which parent."""

    start: np.ndarray
    angle: float
    width: float
    parent: int  # label of the parent vessel in the occupancy map, -1 for the root
    parent_width: float


def _grow_tree(rng: np.random.Generator, size: int) -> list[Tube]:
    """A branching tree from one ostium near the top; vessels never touch, so no loops.

    No loops matters: the ground truth is the set of filled *external* contours, so a loop would
    turn the background it encloses into "vessel".
    """
    occupied = np.zeros((size, size), np.int32)  # label of the vessel (plus margin) per pixel
    side = rng.choice([-1.0, 1.0])
    start = np.array([size * (0.5 + side * rng.uniform(0.1, 0.35)), size * rng.uniform(0.05, 0.25)])
    towards_centre = math.atan2(size * 0.6 - start[1], size / 2 - start[0])
    queue = [_Sprout(start, towards_centre + rng.uniform(-0.4, 0.4), rng.uniform(8.5, 11.0), -1, 0)]
    tree: list[Tube] = []
    while queue and len(tree) < _MAX_BRANCHES:
        sprout = queue.pop(0)
        label = len(tree) + 1
        tube, children = _grow_branch(rng, sprout, label, occupied)
        if len(tube.points) >= 2:
            tree.append(tube)
            queue.extend(children)
    return tree


def _grow_branch(
    rng: np.random.Generator, sprout: _Sprout, label: int, occupied: np.ndarray
) -> tuple[Tube, list[_Sprout]]:
    """Grow vessel ``label`` until it thins out, leaves the image or comes near another vessel.

    The vessel may overlap its parent only while it gets clear of it (it starts on the parent's
    centre line), and it marks its own path in ``occupied`` a few steps behind its tip, so it
    cannot curl into itself either. Widths taper slowly and drop at each fork by Murray's law
    (w^3 = w_parent^3 + w_child^3). Returns the tube and the side branches it spawned.
    """
    point, angle, width = sprout.start.astype(np.float64), sprout.angle, sprout.width
    clearance = 2.2 * (sprout.parent_width / 2 + width / 2 + 3)
    points, widths, children = [point], [width], []
    turn, travelled, marked = 0.0, 0.0, 1
    next_fork = rng.uniform(15, 45)
    taper = math.exp(-STEP / rng.uniform(500, 1000))
    lag = int(width + 10) // int(STEP) + 1
    while width >= 1.0 and len(points) < 400:
        turn = 0.9 * turn + rng.normal(0.0, 0.018)  # smoothly varying curvature
        angle += turn
        point = point + STEP * np.array([math.cos(angle), math.sin(angle)])
        travelled += STEP
        width = width * taper - STEP * 0.002  # the constant term ends thin vessels
        allowed = sprout.parent if travelled <= clearance else -1
        if _blocked(occupied, point, width, allowed):
            break
        points.append(point)
        widths.append(width)
        marked = _mark(occupied, label, points, widths, marked, len(points) - lag)
        if travelled >= next_fork and width > 1.6:
            child = width * rng.uniform(0.4, 0.8)
            side = rng.choice([-1.0, 1.0])
            children.append(
                _Sprout(point, angle + side * rng.uniform(0.5, 1.1), child, label, width)
            )
            width = max(1.0, (width**3 - child**3) ** (1 / 3))
            angle -= side * rng.uniform(0.05, 0.25)  # the parent bends away from its branch
            next_fork = travelled + rng.uniform(20, 50)
    _mark(occupied, label, points, widths, marked, len(points))
    return Tube(np.array(points), np.array(widths)), children


def _blocked(occupied: np.ndarray, point: np.ndarray, width: float, allowed: int) -> bool:
    """Whether a vessel of ``width`` at ``point`` is off the image or touches another vessel."""
    size = occupied.shape[0]
    x, y = pt(point)
    if not (-8 <= x < size + 8 and -8 <= y < size + 8):
        return True
    r = math.ceil(width / 2) + 1
    window = occupied[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1]
    return bool(np.any((window != 0) & (window != allowed)))


def _mark(
    occupied: np.ndarray,
    label: int,
    points: list[np.ndarray],
    widths: list[float],
    start: int,
    stop: int,
) -> int:
    """Draw path segments ``start .. stop-1`` (2 px margin each side); return the next start."""
    for i in range(start, stop):
        cv2.line(occupied, pt(points[i - 1]), pt(points[i]), label, round(widths[i]) + 4)
    return max(start, stop)


def _grow_catheter(rng: np.random.Generator, size: int) -> Tube:
    """A smooth, constant-width tube entering from the bottom or a side of the image."""
    edge = rng.integers(3)
    along = rng.uniform(0.2, 0.8) * size
    if edge == 0:  # bottom
        point, angle = np.array([along, size + 5.0]), -math.pi / 2
    else:  # left or right
        point = np.array([-5.0 if edge == 1 else size + 5.0, along])
        angle = 0.0 if edge == 1 else math.pi
    angle += rng.uniform(-0.4, 0.4)
    length = rng.uniform(250, 480)
    turn = rng.uniform(-0.006, 0.006)
    points = [point]
    for _ in range(int(length / STEP)):
        turn += rng.normal(0.0, 0.0006)
        angle += turn
        point = point + STEP * np.array([math.cos(angle), math.sin(angle)])
        points.append(point)
    width = rng.uniform(6.5, 9.5)
    return Tube(np.array(points), np.full(len(points), width))


def make_video(seed: int, video: int, size: int) -> Video:
    """What the frames of video ``video`` of the dataset with ``seed`` share, at ``size`` px."""
    rng = np.random.default_rng([seed, video, VIDEO_STREAM])
    tree = _grow_tree(rng, size)
    # Every third video shows a catheter, so any 3 consecutive videos include one.
    catheter = _grow_catheter(rng, size) if video % 3 == 1 else None
    waves = np.column_stack(
        [
            rng.uniform(-1, 1, (4, 2)) * 2 * math.pi / size,  # at most one cycle per image
            rng.uniform(0, 2 * math.pi, 4),
            rng.uniform(0.5, 2.0, 4),
        ]
    )
    return Video(
        tree=tree,
        catheter=catheter,
        background=_background(rng, size),
        centre=rng.uniform(0.35, 0.65, 2) * size,
        waves=waves,
        attenuation=float(rng.uniform(0.07, 0.13)),
        noise=float(rng.uniform(0.012, 0.03)),
    )
