"""The segmenter contract every backend (and the Ray client) satisfies.

``segment(image, prompt) -> Segmentation``: ``image`` is uint8 HxWx3 RGB, ``prompt`` the text that
names what to segment. Equal ``(backend_id, image bytes, prompt)`` must give equal results, so
``backend_id`` has to change whenever the outputs could change (model path and revision, preset
table version, thresholds).

Optionally (:class:`MultiPromptSegmenter`) ``segment_prompts(image, prompts) -> list`` answers
several prompts about one image in one call, in order, with the same answers as ``segment``: a
backend does the image-only work once there (Frangi's filter responses, Sa2VA's vision and SAM2
image encoders), and the worker pool's client sends one request per image. Callers go through
:func:`segment_all`, which uses it when present.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


def check_mask_and_prob(mask: np.ndarray, prob: np.ndarray | None) -> None:
    """Raise ``ValueError`` unless ``mask`` is bool HxW and ``prob`` is None or float32 HxW."""
    if mask.dtype != np.bool_ or mask.ndim != 2:
        raise ValueError(f"mask must be bool HxW, got {mask.dtype} {mask.shape}")
    if prob is not None and (prob.shape != mask.shape or prob.dtype != np.float32):
        raise ValueError(f"prob must be float32 {mask.shape}, got {prob.dtype} {prob.shape}")


@dataclass(frozen=True)
class Segmentation:
    """One backend answer.

    Attributes:
        mask: bool HxW, the backend's hard decision.
        prob: float32 HxW in [0, 1] (soft mask) or ``None`` when the backend cannot give one.
            Threshold actions need it; ``mask`` is ``prob > 0.5`` wherever both exist, unless a
            backend documents another threshold.
        score: the model's own quality estimate (Sa2VA/SAM2 predicted IoU) or ``None``.
        flags: short machine-readable notes, e.g. ``"no_seg_token"`` (Sa2VA answered without a
            [SEG] token, so ``mask`` is empty) or ``"prob_unavailable"``.
    """

    mask: np.ndarray
    prob: np.ndarray | None = None
    score: float | None = None
    flags: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        check_mask_and_prob(self.mask, self.prob)


@runtime_checkable
class Segmenter(Protocol):
    """Anything that segments an image for a text prompt."""

    @property
    def backend_id(self) -> str:
        """Identifies the outputs: changes whenever the same input could give another answer."""
        ...

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        """Segment what ``prompt`` names in ``image`` (uint8 HxWx3 RGB)."""
        ...


@runtime_checkable
class MultiPromptSegmenter(Segmenter, Protocol):
    """A segmenter that also answers several prompts about one image in one call."""

    def segment_prompts(self, image: np.ndarray, prompts: Sequence[str]) -> list[Segmentation]:
        """``[segment(image, p) for p in prompts]``, with image-only work done once."""
        ...


def segment_all(
    segmenter: Segmenter, image: np.ndarray, prompts: Sequence[str]
) -> list[Segmentation]:
    """``segmenter.segment(image, p)`` for every prompt, in order, in one call when the
    segmenter offers ``segment_prompts`` (a backend does its image-only work once; the
    worker-pool client makes one round trip and one image transfer per image instead of one per
    prompt); the answers are the same either way."""
    batched = getattr(segmenter, "segment_prompts", None)
    if batched is not None:
        return list(batched(image, list(prompts)))
    return [segmenter.segment(image, p) for p in prompts]


def image_digest(image: np.ndarray) -> str:
    """sha256 (hex) of the image's shape, dtype and bytes: two arrays share it iff they are equal
    element for element with the same shape and dtype. The image part of every cache key."""
    arr = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{arr.shape}|{arr.dtype.str}|".encode())
    digest.update(arr.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


class MemoSegmenter:
    """An in-process LRU memo around a backend, for use without Ray workers (unit tests,
    ``gymnasium.make`` defaults, notebooks): a repeated (image, prompt) is not recomputed."""

    def __init__(self, backend: Segmenter, max_items: int = 512) -> None:
        self.backend = backend
        self.max_items = max_items
        self.forward_passes = 0
        self._memo: OrderedDict[tuple[str, str], Segmentation] = OrderedDict()

    @property
    def backend_id(self) -> str:
        return self.backend.backend_id

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        key = (image_digest(image), prompt)
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        result = self.backend.segment(image, prompt)
        self.forward_passes += 1
        self._memo[key] = result
        if len(self._memo) > self.max_items:
            self._memo.popitem(last=False)
        return result
