"""Observation features: what a policy sees of the image and of the current mask.

The observation is ``image_features (16) + mask_features (7) + progress (1)`` = 24 float32
values, each inside a documented, honest range (see :data:`FEATURES`), so
:func:`observation_space` can state exact ``Box`` bounds. Features are computed from the image
and the current mask / soft mask only; no function here accepts ground truth, which is what keeps
the learned policy usable where there is none.

``image_features`` depends on the image alone and is constant across an episode: compute it once
per image and pass it to :func:`observation` as ``image_feats``. Images larger than
:data:`IMAGE_FEATURE_SIZE` on their longer side are downscaled first (``cv2.INTER_AREA``), which
keeps the call cheap at 512x512 and makes the features comparable across resolutions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import gymnasium as gym
import numpy as np
from skimage.morphology import skeletonize

from envs.morphology import component_areas

IMAGE_FEATURE_SIZE = 256
"""Longer side (px) images are downscaled to before computing image features."""
LOCAL_WINDOW = 7
"""Side of the window for the local standard deviation (local contrast)."""
RIDGE_KERNEL = 15
"""Side of the black-hat kernel: dark structures narrower than this count as ridges."""
CANNY_THRESHOLDS = (50, 150)
"""Canny hysteresis thresholds on the 0..255 grey image, for edge density."""
COMPONENTS_SATURATION = 1000
"""Component count at which the scaled component feature reaches 1."""
SKELETON_SATURATION = 8.0
"""Skeleton length, in units of (H + W), at which the scaled skeleton feature reaches 1."""

# Largest possible 3x3 Sobel magnitude on a [0, 1] image: |gx|, |gy| <= 1 + 2 + 1.
_SOBEL_MAX = 4.0 * math.sqrt(2.0)
# Largest possible |4-neighbour Laplacian| on a [0, 1] image.
_LAPLACIAN_MAX = 4.0


class Feature(NamedTuple):
    """One observation dimension: its name, what it measures, and its exact bounds."""

    name: str
    meaning: str
    low: float
    high: float


IMAGE_FEATURES: tuple[Feature, ...] = (
    Feature("img_mean", "mean grey intensity (grey in [0, 1])", 0.0, 1.0),
    Feature("img_std", "standard deviation of grey intensity", 0.0, 0.5),
    Feature("img_skew", "tanh(skewness / 2) of grey intensity; 0 for a constant image", -1.0, 1.0),
    Feature(
        "img_kurtosis", "tanh(excess kurtosis / 5) of grey intensity; 0 if constant", -1.0, 1.0
    ),
    Feature("img_p05", "5th percentile of grey intensity", 0.0, 1.0),
    Feature("img_p25", "25th percentile of grey intensity", 0.0, 1.0),
    Feature("img_p50", "median grey intensity", 0.0, 1.0),
    Feature("img_p75", "75th percentile of grey intensity", 0.0, 1.0),
    Feature("img_p95", "95th percentile of grey intensity", 0.0, 1.0),
    Feature("grad_mean", "mean 3x3 Sobel gradient magnitude / its maximum 4*sqrt(2)", 0.0, 1.0),
    Feature("grad_std", "standard deviation of the normalised Sobel magnitude", 0.0, 0.5),
    Feature(
        "laplacian_std",
        "standard deviation of the 4-neighbour Laplacian / 4 (sqrt of the Laplacian variance)",
        0.0,
        1.0,
    ),
    Feature("local_contrast", "mean of the 7x7 local standard deviation", 0.0, 0.5),
    Feature(
        "dark_ridge",
        "mean black-hat (15x15 ellipse closing minus image): thin dark structures such as "
        "contrast-filled vessels",
        0.0,
        1.0,
    ),
    Feature("edge_density", "fraction of pixels on Canny(50, 150) edges", 0.0, 1.0),
    Feature("img_entropy", "Shannon entropy of the 256-bin grey histogram / 8 bits", 0.0, 1.0),
)

MASK_FEATURES: tuple[Feature, ...] = (
    Feature("mask_area", "fraction of pixels in the mask", 0.0, 1.0),
    Feature(
        "mask_components",
        "8-connected component count, log1p(n) / log1p(1000), clipped at 1",
        0.0,
        1.0,
    ),
    Feature(
        "mask_largest_share", "largest component's share of the mask area; 0 if empty", 0.0, 1.0
    ),
    Feature("mask_skeleton", "skeleton pixel count / (8 * (H + W)), clipped at 1", 0.0, 1.0),
    Feature(
        "prob_inside", "mean soft probability inside the mask; 0 without prob or mask", 0.0, 1.0
    ),
    Feature(
        "prob_outside",
        "mean soft probability outside the mask; 0 without prob or if full",
        0.0,
        1.0,
    ),
    Feature("has_prob", "1 when a soft mask exists, else 0", 0.0, 1.0),
)

PROGRESS_FEATURE = Feature("progress", "step / max_steps", 0.0, 1.0)

FEATURES: tuple[Feature, ...] = (*IMAGE_FEATURES, *MASK_FEATURES, PROGRESS_FEATURE)
"""Every observation dimension, in order."""
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
IMAGE_FEATURE_DIM = len(IMAGE_FEATURES)
MASK_FEATURE_DIM = len(MASK_FEATURES)
OBSERVATION_DIM = len(FEATURES)


def observation_space() -> gym.spaces.Box:
    """The ``Box`` every :func:`observation` lies in, with per-dimension bounds from FEATURES."""
    low = np.array([f.low for f in FEATURES], dtype=np.float32)
    high = np.array([f.high for f in FEATURES], dtype=np.float32)
    return gym.spaces.Box(low=low, high=high, dtype=np.float32)


def observation(
    image: np.ndarray,
    mask: np.ndarray | None,
    prob: np.ndarray | None,
    step: int,
    max_steps: int,
    image_feats: np.ndarray | None = None,
    mask_feats: np.ndarray | None = None,
) -> np.ndarray:
    """float32[24]: image features, mask features, progress.

    Args:
        image: uint8 HxWx3 RGB (or HxW grey); ignored when ``image_feats`` is given.
        mask: bool HxW, the current mask (``None`` only with ``mask_feats``).
        prob: float32 HxW soft mask in [0, 1], or ``None``.
        step: steps taken so far in the episode, 0..max_steps.
        max_steps: episode length limit, >= 1.
        image_feats: cached ``image_features(image)``, to skip recomputing it every step.
        mask_feats: cached ``mask_features(mask, prob)`` (``mask`` and ``prob`` are then
            ignored), for a state whose features are known already.
    """
    if max_steps < 1 or not 0 <= step <= max_steps:
        raise ValueError(f"need 0 <= step <= max_steps and max_steps >= 1, got {step}/{max_steps}")
    img = image_features(image) if image_feats is None else image_feats
    if img.shape != (IMAGE_FEATURE_DIM,):
        raise ValueError(f"image_feats must have shape ({IMAGE_FEATURE_DIM},), got {img.shape}")
    if mask_feats is None:
        if mask is None:
            raise ValueError("observation needs the mask or its mask_feats")
        mask_feats = mask_features(mask, prob)
    msk = mask_feats
    if msk.shape != (MASK_FEATURE_DIM,):
        raise ValueError(f"mask_feats must have shape ({MASK_FEATURE_DIM},), got {msk.shape}")
    progress = np.array([step / max_steps], dtype=np.float32)
    return np.concatenate([img, msk, progress]).astype(np.float32)


def image_features(image: np.ndarray) -> np.ndarray:
    """float32[16] intensity, gradient and texture statistics of ``image`` (see IMAGE_FEATURES).

    ``image`` is uint8 HxWx3 RGB or HxW grey. Cheap (a few ms at 512x512), but constant per
    image: callers should cache it.
    """
    grey_u8 = _grey_u8(image)
    grey = grey_u8.astype(np.float32) / 255.0
    values = [
        *_moments(grey_u8),
        *np.percentile(grey, [5, 25, 50, 75, 95]).tolist(),
        *_gradient_stats(grey),
        _local_contrast(grey),
        _dark_ridge(grey),
        float(np.count_nonzero(cv2.Canny(grey_u8, *CANNY_THRESHOLDS))) / grey.size,
        _entropy(grey_u8),
    ]
    return _clip_to(np.array(values, dtype=np.float32), IMAGE_FEATURES)


def mask_features(mask: np.ndarray, prob: np.ndarray | None) -> np.ndarray:
    """float32[7] statistics of the current mask and soft mask (see MASK_FEATURES)."""
    if mask.dtype != np.bool_ or mask.ndim != 2:
        raise ValueError(f"mask must be bool HxW, got {mask.dtype} {mask.shape}")
    if prob is not None and prob.shape != mask.shape:
        raise ValueError(f"prob shape {prob.shape} differs from mask shape {mask.shape}")
    h, w = mask.shape
    area = int(np.count_nonzero(mask))
    _, areas = component_areas(mask, connectivity=8)
    n = len(areas)
    largest = int(areas[1:].max()) if n > 1 else 0
    # skimage's skeletonize needs a writable buffer; masks from Ray are read-only.
    skeleton_px = int(np.count_nonzero(skeletonize(mask.copy()))) if area else 0
    inside = outside = 0.0
    if prob is not None:
        if area:
            inside = float(prob[mask].mean(dtype=np.float64))
        if area < mask.size:
            outside = float(prob[~mask].mean(dtype=np.float64))
    values = [
        area / mask.size,
        math.log1p(n - 1) / math.log1p(COMPONENTS_SATURATION),
        largest / area if area else 0.0,
        skeleton_px / (SKELETON_SATURATION * (h + w)),
        inside,
        outside,
        float(prob is not None),
    ]
    return _clip_to(np.array(values, dtype=np.float32), MASK_FEATURES)


def _clip_to(values: np.ndarray, specs: tuple[Feature, ...]) -> np.ndarray:
    # Saturating features (counts, lengths) are meant to clip; for the rest this only absorbs
    # float rounding, e.g. a std of 0.5000001.
    low = np.array([f.low for f in specs], dtype=np.float32)
    high = np.array([f.high for f in specs], dtype=np.float32)
    return np.clip(np.nan_to_num(values, nan=0.0), low, high)


def _grey_u8(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    ):
        raise ValueError(f"image must be uint8 HxWx3 RGB or HxW, got {image.dtype} {image.shape}")
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    h, w = grey.shape
    scale = IMAGE_FEATURE_SIZE / max(h, w)
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(grey)


def _moments(grey_u8: np.ndarray) -> tuple[float, float, float, float]:
    """mean, std, squashed skewness, squashed excess kurtosis of grey / 255.

    Computed from the 256-bin histogram: exact for uint8 input and far cheaper than powers of
    every pixel.
    """
    weights = np.bincount(grey_u8.ravel(), minlength=256) / grey_u8.size
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean = float(weights @ levels)
    centred = levels - mean
    var = float(weights @ centred**2)
    # A (near-)constant image has no defined shape moments: report 0 rather than noise.
    if var < 1e-12:
        return mean, 0.0, 0.0, 0.0
    skew = float(weights @ centred**3) / var**1.5
    kurt = float(weights @ centred**4) / var**2 - 3.0
    return mean, math.sqrt(var), math.tanh(skew / 2.0), math.tanh(kurt / 5.0)


def _gradient_stats(grey: np.ndarray) -> tuple[float, float, float]:
    """Normalised Sobel magnitude mean and std, normalised Laplacian std."""
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    mag = cv2.magnitude(gx, gy) / _SOBEL_MAX
    lap = cv2.Laplacian(grey, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REPLICATE)
    lap_std = float(np.std(lap, dtype=np.float64)) / _LAPLACIAN_MAX
    return float(mag.mean(dtype=np.float64)), float(mag.std(dtype=np.float64)), lap_std


def _local_contrast(grey: np.ndarray) -> float:
    """Mean of the local standard deviation over LOCAL_WINDOW x LOCAL_WINDOW windows."""
    k = (LOCAL_WINDOW, LOCAL_WINDOW)
    # Centred on the global mean and in float64, so that E[x^2] - E[x]^2 does not cancel into
    # noise (a constant image gives exactly 0); the clamp covers rounding below 0.
    x = grey.astype(np.float64) - float(grey.mean(dtype=np.float64))
    mean = cv2.blur(x, k, borderType=cv2.BORDER_REFLECT)
    mean_sq = cv2.blur(x * x, k, borderType=cv2.BORDER_REFLECT)
    local_std = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
    return float(local_std.mean(dtype=np.float64))


def _dark_ridge(grey: np.ndarray) -> float:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (RIDGE_KERNEL, RIDGE_KERNEL))
    blackhat = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, kernel, borderType=cv2.BORDER_REPLICATE)
    return float(blackhat.mean(dtype=np.float64))


def _entropy(grey_u8: np.ndarray) -> float:
    hist = np.bincount(grey_u8.ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / grey_u8.size
    return float(-(p * np.log2(p)).sum()) / 8.0
