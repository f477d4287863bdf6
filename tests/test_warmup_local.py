"""The cache warm-up over in-process workers (no Ray): the same spreading, counting and errors
as over Ray actors (``tests/test_warmup.py``), in the default suite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fakes import FakeBackendFactory, FakeSegmenter, random_image

from models.segmentation import Segmentation
from orchestrator.inference.client import SegmentationClient
from orchestrator.inference.warmup import warm_up_pool
from orchestrator.inference.worker import SegmentationWorker

PROMPTS = ["p0", "p1", "p2"]


class _BrokenBackend(FakeSegmenter):
    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        raise RuntimeError(f"backend broke on {prompt}")


def test_in_process_pool_without_ray(tmp_path: Path) -> None:
    workers = [SegmentationWorker(f"w{i}", FakeBackendFactory(), str(tmp_path)) for i in range(2)]
    client = SegmentationClient.in_process(workers)
    images = [random_image(s) for s in range(10)]
    done: list[int] = []
    report = warm_up_pool(client, images, PROMPTS, window=3, on_image=lambda: done.append(1))
    assert (report.images, report.computed, report.cached, len(done)) == (10, 30, 0, 10)
    assert sum(report.images_per_worker) == 10
    assert sum(w.stats()["forward_passes"] for w in workers) == 30

    broken = SegmentationClient.in_process([SegmentationWorker("b", _BrokenBackend, None)])
    with pytest.raises(RuntimeError, match="backend broke on p0"):
        warm_up_pool(broken, images, PROMPTS)
    with pytest.raises(ValueError, match="window must be >= 1"):
        warm_up_pool(client, images, PROMPTS, window=0)
