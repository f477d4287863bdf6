"""One dataset item, as every loader, environment and evaluation step sees it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sample:
    """An image with its ground truth.

    Attributes:
        id: unique name of the image within its dataset (its file name, e.g.
            ``synth(003)_1-3_1_51C3E6A0_frame_000011.jpg``).
        group: the video (or other unit) the image belongs to; splits never cut a group.
        image: uint8 HxWx3 RGB.
        mask: bool HxW ground truth, or ``None`` for a dataset without annotations.
    """

    id: str
    group: str
    image: np.ndarray
    mask: np.ndarray | None = None
