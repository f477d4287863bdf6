"""The built-in segmentation backend: multi-scale Frangi vesselness with per-prompt presets.

A classical, deterministic, CPU-only stand-in for Sa2VA. Each prompt selects a *preset* (which
Hessian scales to look at, where to threshold, whether to enhance contrast first, which
connected components to drop, whether to remove a catheter), so that the prompt changes the
answer the way its words ask for. This is what lets the prompt-choosing experiments learn
something without a GPU.

How a prompt becomes a preset:

1. the prompt, lower-cased with runs of whitespace collapsed, is looked up in
   :data:`PROMPT_PRESETS` (one explicit entry per candidate in :mod:`models.prompts`);
2. otherwise the first rule of :data:`KEYWORD_RULES` whose keyword starts a word of the prompt
   names the preset (e.g. "find the tiny vessels" -> ``"thin"``, "outline vessels but not the
   wire" -> ``"catheter"``);
3. otherwise the ``"default"`` preset.

What ``segment`` returns:

- ``prob``: vesselness ``v`` (max over the preset's scales of ``skimage.filters.frangi`` with
  dark ridges) mapped through ``v**2 / (v**2 + t**2)`` with ``t`` the preset's threshold, so
  ``prob == 0.5`` exactly at the threshold for *every* preset: a threshold action at 0.25 means
  "a bit more permissive than this prompt's own choice" whatever the prompt. Where the preset
  removes a catheter, ``prob`` is 0 in its zone: ignoring it is what the prompt asked for.
- ``mask``: ``prob > 0.5``, then connected components (8-connected) smaller than the preset's
  ``min_component_px`` are dropped, then (presets that ignore the catheter) the
  :func:`catheter_zone` of what is left is removed. So ``mask`` is a subset of ``prob > 0.5``;
  components are dropped from ``mask`` only, since at another threshold they would differ.
- ``score``: ``None`` (no self-estimate of quality).

Vesselness scale normalisation: scikit-image's Hessian is not scale-normalised, so each scale
``s`` is filtered on its own with ``gamma = GAMMA / s**2``, which is the same as comparing the
scale-normalised Hessian norm ``s**2 * |H|`` against ``GAMMA`` (an absolute contrast level in
image units 0..1). A fixed ``gamma`` keeps the response contrast-dependent, as a real detector
is: faint vessels score low, which is what "low contrast" prompts are for.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
import time
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from skimage.filters import frangi
from skimage.morphology import skeletonize

from models.segmentation import Segmentation

PRESET_VERSION = 1
"""Bump when the code that turns a preset into a mask changes (it is part of ``backend_id``)."""

GAMMA = 0.04
"""Frangi structuredness constant for the scale-normalised Hessian norm (image units 0..1)."""

BETA = 0.5
"""Frangi blobness constant (scikit-image's default)."""

PROB_SHARPNESS = 2.0
"""Exponent ``k`` of the vesselness -> probability map ``v**k / (v**k + t**k)``."""

CLAHE_CLIP, CLAHE_TILES = 2.0, 8


@dataclass(frozen=True)
class FrangiPreset:
    """How to segment for one kind of request.

    Attributes:
        sigmas: Hessian scales in px; small ones (1.2) catch 1-2 px vessels, large ones (4-5.5)
            the main arteries. Vesselness is the maximum over these scales.
        threshold: vesselness at which ``prob`` is 0.5 (and above which a pixel is vessel).
        min_component_px: connected mask components smaller than this are dropped (noise).
        clahe: enhance local contrast (CLAHE) before filtering: brings up faint vessels.
        suppress_catheter: remove long, wide, constant-width tubes that enter from the image
            border (a catheter), see :func:`catheter_zone`.
    """

    sigmas: tuple[float, ...]
    threshold: float
    min_component_px: int
    clahe: bool = False
    suppress_catheter: bool = False


_ALL = (1.2, 1.6, 2.2, 3.0, 4.0)
_FINE = (1.2, 1.6, 2.2, 3.0)
_STANDARD = (1.6, 2.2, 3.0)
_LARGE = (2.2, 3.0, 4.0, 5.5)

PRESETS: dict[str, FrangiPreset] = {
    "default": FrangiPreset(_STANDARD, 0.075, 60),
    "small_branches": FrangiPreset(_FINE, 0.05, 40),
    "thin_careful": FrangiPreset(_FINE, 0.06, 80),
    "low_contrast": FrangiPreset(_STANDARD, 0.30, 80, clahe=True),
    "main_arteries": FrangiPreset(_LARGE, 0.12, 300),
    "large": FrangiPreset(_LARGE[1:], 0.15, 300),
    "precision": FrangiPreset(_STANDARD, 0.12, 150),
    "recall": FrangiPreset(_ALL, 0.035, 30),
    "catheter": FrangiPreset(_STANDARD, 0.075, 60, suppress_catheter=True),
    "thin": FrangiPreset(_FINE[:3], 0.05, 40),
    "denoise": FrangiPreset(_STANDARD, 0.085, 250),
}
"""Named presets; what each does is in its parameters (see :class:`FrangiPreset`)."""

PROMPT_PRESETS: dict[str, str] = {
    "segment the blood vessel": "default",
    "segment all blood vessels including small branches": "small_branches",
    "carefully segment blood vessel with thin branches": "thin_careful",
    "segment blood vessel even in low contrast regions": "low_contrast",
    "segment the main coronary arteries": "main_arteries",
    "segment only the large vessels": "large",
    "segment the vessel tree with high precision": "precision",
    "segment every vessel, favour recall over precision": "recall",
    "segment the contrast-filled vessels and ignore the catheter": "catheter",
    "segment the thin distal vessels": "thin",
    "segment the blood vessels and remove noise": "denoise",
}
"""The candidate prompts (normalised: lower case, single spaces) and their presets."""

KEYWORD_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("catheter", "wire", "guidewire", "tube"), "catheter"),
    (("low contrast", "low-contrast", "faint", "dim", "washed out", "washed-out"), "low_contrast"),
    (("precision", "precise", "precisely", "accurate", "strict", "conservative"), "precision"),
    (("noise", "noisy", "clean", "speckle", "denoise"), "denoise"),
    (("recall", "sensitive", "sensitivity", "every", "miss nothing"), "recall"),
    (("main", "major", "trunk", "proximal"), "main_arteries"),
    (("large", "larger", "largest", "big", "wide", "thick"), "large"),
    (("distal", "thin", "thinner", "tiny", "fine", "capillary", "capillaries"), "thin"),
    (("small", "smaller", "smallest", "branch"), "thin"),
)
"""Keyword -> preset for prompts not in :data:`PROMPT_PRESETS`; the first matching rule wins.

A keyword matches a whole word (or words) of the normalised prompt, optionally followed by a
plural "s"/"es": "branch" matches "branches", "main" matches neither "remain" nor "maintain".
"""

DEFAULT_PRESET = "default"

# Catheter detector, see catheter_zone.
CATHETER_SEED_LENGTH_PX = 50
CATHETER_PIECE_LENGTH_PX = 30
CATHETER_MIN_WIDTH_PX = 6.0
CATHETER_MAX_WIDTH_SPREAD = 0.15
CATHETER_BORDER_PX = 5
CATHETER_WIDTH_TOLERANCE = 0.2


def normalise_prompt(prompt: str) -> str:
    """Lower case with runs of whitespace collapsed: the form looked up in PROMPT_PRESETS."""
    return " ".join(prompt.lower().split())


def preset_name_for(prompt: str) -> str:
    """The name of the preset that ``prompt`` selects (see the module docstring)."""
    text = normalise_prompt(prompt)
    if text in PROMPT_PRESETS:
        return PROMPT_PRESETS[text]
    for keywords, name in KEYWORD_RULES:
        if any(re.search(rf"\b{re.escape(word)}(?:e?s)?\b", text) for word in keywords):
            return name
    return DEFAULT_PRESET


def _table_fingerprint() -> str:
    table = {
        "version": PRESET_VERSION,
        "presets": {name: asdict(preset) for name, preset in PRESETS.items()},
        "prompts": PROMPT_PRESETS,
        "keywords": KEYWORD_RULES,
        "default": DEFAULT_PRESET,
        "params": [GAMMA, BETA, PROB_SHARPNESS, CLAHE_CLIP, CLAHE_TILES],
        "catheter": [
            CATHETER_SEED_LENGTH_PX,
            CATHETER_PIECE_LENGTH_PX,
            CATHETER_MIN_WIDTH_PX,
            CATHETER_MAX_WIDTH_SPREAD,
            CATHETER_BORDER_PX,
            CATHETER_WIDTH_TOLERANCE,
        ],
    }
    blob = json.dumps(table, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class FrangiStats:
    """Counters of one segmenter: calls, per-scale responses computed vs reused, time spent."""

    calls: int
    responses_computed: int
    responses_reused: int
    total_seconds: float
    last_seconds: float

    @property
    def mean_seconds(self) -> float:
        return self.total_seconds / self.calls if self.calls else 0.0


class FrangiSegmenter:
    """Prompted vessel segmentation by multi-scale Frangi vesselness (the default backend).

    Deterministic and CPU-only; any prompt text is accepted (see the module docstring for how
    prompts map to presets). Per-scale responses of the most recent image are kept, so asking
    several prompts about one image in a row costs little more than one. Safe to share between
    threads (calls are serialised).
    """

    def __init__(self) -> None:
        self._backend_id = "frangi:" + _table_fingerprint()
        self._lock = threading.Lock()
        self._image_key = b""
        self._responses: dict[tuple[bool, float], np.ndarray] = {}
        self._greys: dict[bool, np.ndarray] = {}
        self._calls = self._computed = self._reused = 0
        self._total = self._last = 0.0

    @property
    def backend_id(self) -> str:
        """``"frangi:" + hash`` of the preset table, prompt mapping and every parameter."""
        return self._backend_id

    def stats(self) -> FrangiStats:
        """Counters since construction."""
        return FrangiStats(self._calls, self._computed, self._reused, self._total, self._last)

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        """Segment the vessels of ``image`` (uint8 HxWx3 RGB) the way ``prompt`` asks."""
        _check_image(image)
        preset = PRESETS[preset_name_for(prompt)]
        with self._lock:
            start = time.perf_counter()
            self._select_image(image)
            vesselness = self._vesselness(preset)
            result = _to_segmentation(vesselness, preset)
            self._last = time.perf_counter() - start
            self._total += self._last
            self._calls += 1
        return result

    def _select_image(self, image: np.ndarray) -> None:
        key = hashlib.sha256(image.tobytes()).digest() + repr(image.shape).encode()
        if key != self._image_key:
            self._image_key = key
            self._responses.clear()
            self._greys = {False: cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)}

    def _grey(self, clahe: bool) -> np.ndarray:
        if clahe not in self._greys:
            enhancer = cv2.createCLAHE(CLAHE_CLIP, (CLAHE_TILES, CLAHE_TILES))
            self._greys[clahe] = enhancer.apply(self._greys[False])
        return self._greys[clahe]

    def _vesselness(self, preset: FrangiPreset) -> np.ndarray:
        out: np.ndarray | None = None
        for sigma in preset.sigmas:
            response = self._response(preset.clahe, sigma)
            out = response if out is None else np.maximum(out, response)
        assert out is not None
        return out

    def _response(self, clahe: bool, sigma: float) -> np.ndarray:
        key = (clahe, sigma)
        if key in self._responses:
            self._reused += 1
        else:
            self._computed += 1
            grey = self._grey(clahe).astype(np.float32) / 255.0
            self._responses[key] = frangi(
                grey, sigmas=[sigma], beta=BETA, gamma=GAMMA / sigma**2, black_ridges=True
            ).astype(np.float32)
        return self._responses[key]


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 HxWx3 RGB, got {image.dtype} {image.shape}")


def _to_segmentation(vesselness: np.ndarray, preset: FrangiPreset) -> Segmentation:
    powered = vesselness**PROB_SHARPNESS
    prob = (powered / (powered + preset.threshold**PROB_SHARPNESS)).astype(np.float32)
    mask = drop_small_components(prob > 0.5, preset.min_component_px)
    if preset.suppress_catheter:
        zone = catheter_zone(mask)
        mask &= ~zone
        prob[zone] = 0.0
    return Segmentation(mask=mask, prob=prob)


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
        widths = width[ys, xs]
        median = float(np.median(widths))
        if len(ys) < CATHETER_PIECE_LENGTH_PX or median < CATHETER_MIN_WIDTH_PX:
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
