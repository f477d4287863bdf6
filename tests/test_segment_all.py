"""``segment_all``: one batched call when the segmenter offers one, the same answers either way."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from fakes import FakeSegmenter, random_image

from models.segmentation import Segmentation, segment_all


class Batching(FakeSegmenter):
    """The fake, plus ``segment_prompts`` that records its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    def segment_prompts(self, image: np.ndarray, prompts: Sequence[str]) -> list[Segmentation]:
        self.batches.append(list(prompts))
        return [self.segment(image, p) for p in prompts]


def test_one_call_per_image_when_batched_and_same_answers() -> None:
    image, prompts = random_image(3), ["p1", "p0", "p1"]
    batching, plain = Batching(), FakeSegmenter()
    got, want = segment_all(batching, image, prompts), segment_all(plain, image, prompts)
    assert batching.batches == [prompts]
    assert [g.mask.tobytes() for g in got] == [w.mask.tobytes() for w in want]
    assert [g.score for g in got] == [w.score for w in want]
