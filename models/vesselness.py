"""Image operations of the Frangi backend: the vesselness filter and the catheter detector.

:func:`frangi_response` is the Frangi et al. (1998) vesselness of one Hessian scale for dark
ridges, written on OpenCV separable filters. It computes what
``skimage.filters.frangi(grey, sigmas=[sigma], beta=beta, gamma=gamma, black_ridges=True)``
computes (same Gaussian-derivative kernels, truncation and reflected border) at 4-7x the speed,
which is what a CPU worker spends most of its time on. Values agree to 1e-5 except at a few
pixels per image where the larger eigenvalue is about 0 and float32 rounding decides its sign
(the response there is 0 in one and up to ~0.3 in the other).
"""

from __future__ import annotations

import functools
import itertools
import math

import cv2
import numpy as np
from skimage.morphology import skeletonize

# Catheter detector, see catheter_zone.
CATHETER_SEED_LENGTH_PX = 50
CATHETER_PIECE_LENGTH_PX = 30
CATHETER_MIN_WIDTH_PX = 6.0
CATHETER_MAX_WIDTH_SPREAD = 0.15
CATHETER_BORDER_PX = 5
CATHETER_WIDTH_TOLERANCE = 0.2


def catheter_params() -> list[float]:
    """The catheter detector's current parameters (part of the backend's fingerprint)."""
    return [
        CATHETER_SEED_LENGTH_PX,
        CATHETER_PIECE_LENGTH_PX,
        CATHETER_MIN_WIDTH_PX,
        CATHETER_MAX_WIDTH_SPREAD,
        CATHETER_BORDER_PX,
        CATHETER_WIDTH_TOLERANCE,
    ]


@functools.lru_cache(maxsize=32)
def _gaussian_kernels(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(smoothing, first-derivative) 1-D kernels of one of the two passes that make a
    second-order Gaussian derivative of scale ``sigma``: each pass has scale sigma/sqrt(2),
    truncated at 8 of those (100 for sigma <= 1, where short kernels alias). The derivative
    kernel is given in correlation form (OpenCV filters correlate), i.e. already mirrored.
    Cached, so read-only."""
    s = sigma / math.sqrt(2)
    radius = int((8 if sigma > 1 else 100) * s + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 * x**2 / s**2)
    phi /= phi.sum()
    smooth, deriv = phi.astype(np.float32), (x / s**2 * phi).astype(np.float32)
    smooth.flags.writeable = deriv.flags.writeable = False  # shared by every caller
    return smooth, deriv


def frangi_response(grey: np.ndarray, sigma: float, beta: float, gamma: float) -> np.ndarray:
    """Frangi vesselness of dark ridges at one scale (float32 HxW in [0, 1)).

    ``grey`` is float32 HxW (image units 0..1). Hessian by Gaussian derivatives of scale
    ``sigma`` (reflected border), eigenvalues ``l1, l2`` sorted by magnitude, ``l2`` clipped to
    1e-10 (bright-ridge pixels, ``l2 < 0``, score 0), then
    ``exp(-(l1/l2)**2 / (2 beta**2)) * (1 - exp(-(l1**2 + l2**2) / (2 gamma**2)))``.
    """
    smooth, deriv = _gaussian_kernels(sigma)
    border = cv2.BORDER_REFLECT

    def filt(image: np.ndarray, along_x: np.ndarray, along_y: np.ndarray) -> np.ndarray:
        return cv2.sepFilter2D(image, cv2.CV_32F, along_x, along_y, borderType=border)

    grad_r, grad_c = filt(grey, smooth, deriv), filt(grey, deriv, smooth)
    h_rr, h_rc, h_cc = (
        filt(grad_r, smooth, deriv),
        filt(grad_r, deriv, smooth),
        filt(grad_c, deriv, smooth),
    )
    half_trace = (h_rr + h_cc) / 2
    root = np.sqrt(h_rc**2 + ((h_rr - h_cc) / 2) ** 2)
    first, second = half_trace + root, half_trace - root
    swap = np.abs(first) < np.abs(second)
    small = np.where(swap, first, second)
    large = np.maximum(np.where(swap, second, first), np.float32(1e-10))
    blobness = np.exp(-((small / large) ** 2) / np.float32(2 * beta**2))
    structure = 1 - np.exp(-(small**2 + large**2) / np.float32(2 * gamma**2))
    return (blobness * structure).astype(np.float32)


def drop_small_components(mask: np.ndarray, min_px: int) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False  # background
    return keep[labels]


def catheter_zone(mask: np.ndarray) -> np.ndarray:
    """Where ``mask`` shows a catheter-like tube: the tube plus a 2 px rim (bool HxW).

    The mask's skeleton is cut at its junctions into segments, each with a median width (from
    the distance transform) and a width spread. A catheter enters from outside the image with a
    constant width, so a *seed* is a segment that touches the image border, is at least
    CATHETER_SEED_LENGTH_PX long and CATHETER_MIN_WIDTH_PX wide, and keeps its width (spread
    <= CATHETER_MAX_WIDTH_SPREAD); vessels start inside the image and taper, so their wide parts
    do not reach the border. Vessels crossing the catheter cut its skeleton into pieces; a piece
    at least CATHETER_PIECE_LENGTH_PX long, as steady and within CATHETER_WIDTH_TOLERANCE of the
    seed's width, whose skeleton comes near the zone found so far, is added too (repeatedly).
    Only the parts of a piece whose width stays within the tolerance count, so a vessel
    crossing or merging into the catheter keeps most of its pixels. The rim lets callers clear
    the tube's soft halo as well (``prob``), not only its thresholded pixels.
    """
    mask8 = mask.astype(np.uint8)
    width = 2.0 * cv2.distanceTransform(mask8, cv2.DIST_L2, 5)
    pieces = []
    for ys, xs in _skeleton_segments(mask):
        if len(ys) < CATHETER_PIECE_LENGTH_PX:  # most pieces: skip the median
            continue
        widths = width[ys, xs]
        median = float(np.median(widths))
        if median < CATHETER_MIN_WIDTH_PX:
            continue
        if float(widths.std()) > CATHETER_MAX_WIDTH_SPREAD * median:
            continue
        pieces.append((ys, xs, widths, median))
    zone = np.zeros_like(mask8)
    for seed in pieces:
        ys, xs, _, median = seed
        if len(ys) >= CATHETER_SEED_LENGTH_PX and _touches_border(ys, xs, mask.shape):
            _grow_catheter_zone(zone, seed, pieces)
    return zone > 0


def _grow_catheter_zone(
    zone: np.ndarray,
    seed: tuple[np.ndarray, np.ndarray, np.ndarray, float],
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]],
) -> None:
    """Add ``seed`` and, transitively, the nearby pieces of the same width to ``zone``."""
    seed_width = seed[3]
    radius = int(np.ceil(seed_width / 2)) + 2
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    reach = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (4 * radius + 1, 4 * radius + 1))
    similar = [p for p in pieces if abs(p[3] - seed_width) <= CATHETER_WIDTH_TOLERANCE * seed_width]
    todo, added = [seed], {id(seed)}
    while todo:
        ys, xs, widths, _ = todo.pop()
        steady = np.abs(widths - seed_width) <= CATHETER_WIDTH_TOLERANCE * seed_width
        core = np.zeros_like(zone)
        core[ys[steady], xs[steady]] = 1
        zone |= cv2.dilate(core, disc)
        near = cv2.dilate(zone, reach)
        for piece in similar:
            if id(piece) not in added and near[piece[0], piece[1]].any():
                added.add(id(piece))
                todo.append(piece)


def _skeleton_segments(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pixel coordinates (ys, xs) of each junction-free piece of the mask's skeleton."""
    skeleton = skeletonize(mask).astype(np.uint8)
    neighbours = cv2.filter2D(
        skeleton, -1, np.ones((3, 3), np.float32), borderType=cv2.BORDER_CONSTANT
    )
    junctions = (skeleton > 0) & (neighbours - skeleton >= 3)
    skeleton[cv2.dilate(junctions.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0] = 0
    count, labels = cv2.connectedComponents(skeleton, connectivity=8)
    ys, xs = np.nonzero(labels)
    order = np.argsort(labels[ys, xs], kind="stable")
    ys, xs = ys[order], xs[order]
    bounds = np.searchsorted(labels[ys, xs], np.arange(1, count + 1))
    return [(ys[a:b], xs[a:b]) for a, b in itertools.pairwise(bounds)]


def _touches_border(ys: np.ndarray, xs: np.ndarray, shape: tuple[int, ...]) -> bool:
    height, width = shape[:2]
    margin = CATHETER_BORDER_PX
    return bool(
        ys.min() < margin
        or xs.min() < margin
        or ys.max() >= height - margin
        or xs.max() >= width - margin
    )
