"""The segmenter contract every backend (and the Ray client) satisfies.

``segment(image, prompt) -> Segmentation``: ``image`` is uint8 HxWx3 RGB, ``prompt`` the text that
names what to segment. Equal ``(backend_id, image bytes, prompt)`` must give equal results, so
``backend_id`` has to change whenever the outputs could change (model path and revision, preset
table version, thresholds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


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
        if self.mask.dtype != np.bool_ or self.mask.ndim != 2:
            raise ValueError(f"mask must be bool HxW, got {self.mask.dtype} {self.mask.shape}")
        if self.prob is not None and (
            self.prob.shape != self.mask.shape or self.prob.dtype != np.float32
        ):
            raise ValueError(
                f"prob must be float32 {self.mask.shape}, got {self.prob.dtype} {self.prob.shape}"
            )


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
