"""The built-in segmentation backend: multi-scale Frangi vesselness with per-prompt presets.

A classical, deterministic, CPU-only stand-in for Sa2VA. Each prompt selects a *preset* (which
Hessian scales to look at, where to threshold, whether to enhance contrast first, which
connected components to drop, whether to remove a catheter), so that the prompt changes the
answer the way its words ask for. This is what lets the prompt-choosing experiments learn
something without a GPU. Presets and the prompt -> preset mapping are in
:mod:`models.frangi_presets`; the filter and the catheter detector in :mod:`models.vesselness`.

What ``segment`` returns:

- ``prob``: vesselness ``v`` (max over the preset's scales of
  :func:`~models.vesselness.frangi_response`, dark ridges) mapped through
  ``v**2 / (v**2 + t**2)`` with ``t`` the preset's threshold, so ``prob == 0.5`` exactly at the
  threshold for *every* preset: a threshold action at 0.25 means "a bit more permissive than
  this prompt's own choice" whatever the prompt. Where the preset removes a catheter, ``prob``
  is 0 in its zone: ignoring it is what the prompt asked for.
- ``mask``: ``prob > 0.5``, then connected components (8-connected) smaller than the preset's
  ``min_component_px`` are dropped, then (presets that ignore the catheter) the
  :func:`catheter_zone` of what is left is removed. So ``mask`` is a subset of ``prob > 0.5``;
  components are dropped from ``mask`` only, since at another threshold they would differ.
- ``score``: ``None`` (no self-estimate of quality).

Vesselness scale normalisation: the Hessian is not scale-normalised, so each scale ``s`` is
filtered on its own with ``gamma = GAMMA / s**2``, which is the same as comparing the
scale-normalised Hessian norm ``s**2 * |H|`` against ``GAMMA`` (an absolute contrast level in
image units 0..1). A fixed ``gamma`` keeps the response contrast-dependent, as a real detector
is: faint vessels score low, which is what "low contrast" prompts are for.

Work shared between prompts: ``segment_prompts(image, prompts)`` (what a worker calls with the
prompts of one image it has to compute) filters the image once for all of them: presets with
the same contrast setting share their per-scale filter responses, and presets with the same
scales and contrast setting share the whole vesselness map, so only the cheap per-preset steps
(threshold, components, catheter) run per prompt. The responses are also kept for the most
recent ``max_images`` images (keyed by image digest), so ``segment`` called prompt by prompt on
one image shares them too. A result never depends on what was asked before (``np.maximum`` is
exact, so a vesselness map is bit-identical whichever responses were cached).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from models.frangi_presets import (
    DEFAULT_PRESET,
    KEYWORD_RULES,
    PRESETS,
    PROMPT_PRESETS,
    FrangiPreset,
    normalise_prompt,
    preset_name_for,
)
from models.segmentation import Segmentation, image_digest
from models.vesselness import (
    catheter_params,
    catheter_zone,
    drop_small_components,
    frangi_response,
)

__all__ = [
    "BETA",
    "GAMMA",
    "PRESETS",
    "PRESET_VERSION",
    "PROMPT_PRESETS",
    "FrangiPreset",
    "FrangiSegmenter",
    "FrangiStats",
    "catheter_zone",
    "drop_small_components",
    "normalise_prompt",
    "preset_name_for",
]

PRESET_VERSION = 2
"""Bump when the code that turns a preset into a mask changes (it is part of ``backend_id``).
2: own OpenCV Frangi filter (scikit-image's values, 4-7x faster), the seed prompts' presets."""

GAMMA = 0.04
"""Frangi structuredness constant for the scale-normalised Hessian norm (image units 0..1)."""

BETA = 0.5
"""Frangi blobness constant (scikit-image's default)."""

PROB_SHARPNESS = 2.0
"""Exponent ``k`` of the vesselness -> probability map ``v**k / (v**k + t**k)``."""

CLAHE_CLIP, CLAHE_TILES = 2.0, 8

DEFAULT_MAX_IMAGES = 2
"""Images whose filter responses a segmenter keeps (about 1 MB per map at 512x512: at most one
per (contrast setting, scale) plus one per (contrast setting, scale set) per image)."""


def _table_fingerprint() -> str:
    table = {
        "version": PRESET_VERSION,
        "presets": {name: asdict(preset) for name, preset in PRESETS.items()},
        "prompts": PROMPT_PRESETS,
        "keywords": KEYWORD_RULES,
        "default": DEFAULT_PRESET,
        "params": [GAMMA, BETA, PROB_SHARPNESS, CLAHE_CLIP, CLAHE_TILES],
        "catheter": catheter_params(),
    }
    blob = json.dumps(table, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class FrangiStats:
    """Counters of one segmenter.

    Attributes:
        calls: answers given (one per prompt of ``segment`` and ``segment_prompts``).
        responses_computed / responses_reused: of the per-scale filter responses the calls
            needed (one per scale of each call's preset), how many were computed and how many
            came from the cache (directly or inside a cached vesselness map).
        total_seconds / last_seconds: time spent answering, all answers / per answer of the
            last call.
    """

    calls: int
    responses_computed: int
    responses_reused: int
    total_seconds: float
    last_seconds: float

    @property
    def mean_seconds(self) -> float:
        return self.total_seconds / self.calls if self.calls else 0.0


@dataclass
class _ImageMaps:
    """What the presets of one image share: greys, per-scale responses, vesselness powers."""

    greys: dict[bool, np.ndarray]
    responses: dict[tuple[bool, float], np.ndarray] = field(default_factory=dict)
    powered: dict[tuple[bool, tuple[float, ...]], np.ndarray] = field(default_factory=dict)


class FrangiSegmenter:
    """Prompted vessel segmentation by multi-scale Frangi vesselness (the default backend).

    Deterministic and CPU-only; any prompt text is accepted (see :mod:`models.frangi_presets`
    for how prompts map to presets). Filter responses of the last ``max_images`` images are
    kept (see the module docstring), so asking every prompt about one image in a row costs
    little more than the most expensive one. Safe to share between threads (calls are
    serialised).
    """

    def __init__(self, max_images: int = DEFAULT_MAX_IMAGES) -> None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self._backend_id = "frangi:" + _table_fingerprint()
        self._max_images = max_images
        self._lock = threading.Lock()
        self._images: OrderedDict[str, _ImageMaps] = OrderedDict()
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
        return self.segment_prompts(image, [prompt])[0]

    def segment_prompts(self, image: np.ndarray, prompts: Sequence[str]) -> list[Segmentation]:
        """``segment(image, p)`` for every prompt, in order, filtering the image once for all
        of them (see the module docstring); the answers equal those of ``segment``."""
        _check_image(image)
        presets = [PRESETS[preset_name_for(prompt)] for prompt in prompts]
        with self._lock:
            start = time.perf_counter()
            maps = self._maps(image)
            results = [_to_segmentation(self._powered(maps, p), p) for p in presets]
            elapsed = time.perf_counter() - start
            self._last = elapsed / max(1, len(presets))
            self._total += elapsed
            self._calls += len(presets)
        return results

    def _maps(self, image: np.ndarray) -> _ImageMaps:
        key = image_digest(image)
        maps = self._images.get(key)
        if maps is None:
            grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
            maps = self._images[key] = _ImageMaps(greys={False: grey})
            while len(self._images) > self._max_images:
                self._images.popitem(last=False)
        self._images.move_to_end(key)
        return maps

    def _powered(self, maps: _ImageMaps, preset: FrangiPreset) -> np.ndarray:
        """``vesselness ** PROB_SHARPNESS`` of the preset's scales and contrast setting."""
        key = (preset.clahe, preset.sigmas)
        if key in maps.powered:
            self._reused += len(preset.sigmas)
            return maps.powered[key]
        vesselness: np.ndarray | None = None
        for sigma in preset.sigmas:
            response = self._response(maps, preset.clahe, sigma)
            vesselness = response if vesselness is None else np.maximum(vesselness, response)
        assert vesselness is not None
        maps.powered[key] = vesselness**PROB_SHARPNESS
        return maps.powered[key]

    def _response(self, maps: _ImageMaps, clahe: bool, sigma: float) -> np.ndarray:
        key = (clahe, sigma)
        if key in maps.responses:
            self._reused += 1
            return maps.responses[key]
        self._computed += 1
        if clahe not in maps.greys:
            enhancer = cv2.createCLAHE(CLAHE_CLIP, (CLAHE_TILES, CLAHE_TILES))
            maps.greys[clahe] = enhancer.apply(maps.greys[False])
        grey = maps.greys[clahe].astype(np.float32) / 255.0
        maps.responses[key] = frangi_response(grey, sigma, BETA, GAMMA / sigma**2)
        return maps.responses[key]


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 HxWx3 RGB, got {image.dtype} {image.shape}")


def _to_segmentation(powered: np.ndarray, preset: FrangiPreset) -> Segmentation:
    prob = (powered / (powered + preset.threshold**PROB_SHARPNESS)).astype(np.float32)
    mask = drop_small_components(prob > 0.5, preset.min_component_px)
    if preset.suppress_catheter:
        zone = catheter_zone(mask)
        mask &= ~zone
        prob[zone] = 0.0
    return Segmentation(mask=mask, prob=prob)
