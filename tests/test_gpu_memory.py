"""A worker's GPU memory against the plan, on the CPU: torch.cuda replaced by a fake allocator.

The fake GPU has 10000 MB. A worker's share is 1000 MB of weights + 200 MB for one call, so
its process is capped at 1200 / 10000 = 0.12 of the GPU. The fake model allocates its weights
when it loads and side**2 / 1024 MB during a call at input side ``side`` (256 MB at 512 px,
64 MB at 256 px), through the fake allocator, which raises ``torch.OutOfMemoryError`` beyond the
process's cap as CUDA's caching allocator does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from fakes import FakeSegmenter

from models.errors import UserError
from models.segmentation import Segmentation
from orchestrator.cluster import gpu_memory_lines
from orchestrator.inference.gpu_memory import GpuMeter, MemoryShare, describe
from orchestrator.inference.stats import aggregate_stats
from orchestrator.inference.worker import SegmentationWorker

MB = 2**20
SHARE = MemoryShare(weights_mb=1000, worker_mb=1200)


class FakeCuda:
    """The torch.cuda calls the meter makes, recorded, over one device of ``total_mb``."""

    def __init__(self, total_mb: int) -> None:
        self.total = total_mb * MB
        self.allocated = 0
        self.peak = 0
        self.limit: float | None = None
        self.calls: list[tuple[Any, ...]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in (
            "is_available", "current_device", "get_device_properties", "memory_allocated",
            "max_memory_allocated", "reset_peak_memory_stats", "set_per_process_memory_fraction",
            "empty_cache",
        ):  # fmt: skip
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def is_available(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def get_device_properties(self, device: int) -> Any:
        return SimpleNamespace(total_memory=self.total)

    def set_per_process_memory_fraction(self, fraction: float, device: int) -> None:
        self.calls.append(("fraction", fraction, device))
        self.limit = fraction * self.total

    def memory_allocated(self, device: int | None = None) -> int:
        return self.allocated

    def max_memory_allocated(self, device: int | None = None) -> int:
        return self.peak

    def reset_peak_memory_stats(self, device: int | None = None) -> None:
        self.calls.append(("reset_peak", device))
        self.peak = self.allocated

    def empty_cache(self) -> None:
        self.calls.append(("empty_cache",))

    def allocate(self, mb: int) -> None:
        if self.limit is not None and self.allocated + mb * MB > self.limit:
            raise torch.OutOfMemoryError(f"fake: {mb} MB more is over the process's cap")
        self.allocated += mb * MB
        self.peak = max(self.peak, self.allocated)

    def free(self, mb: int) -> None:
        self.allocated -= mb * MB


class HungrySegmenter(FakeSegmenter):
    def __init__(self, cuda: FakeCuda) -> None:
        super().__init__("hungry", input_cap=512)
        self.cuda = cuda

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        side = min(max(image.shape[:2]), self.input_cap or 10**6)
        self.cuda.allocate(side * side // 1024)
        self.cuda.free(side * side // 1024)
        return super().segment(image, prompt)


@dataclass(frozen=True)
class HungryFactory:
    cuda: FakeCuda
    weights_mb: int

    def __call__(self) -> HungrySegmenter:
        self.cuda.calls.append(("load",))
        self.cuda.allocate(self.weights_mb)
        return HungrySegmenter(self.cuda)


def worker(cuda: FakeCuda, weights_mb: int, share: MemoryShare | None = SHARE) -> Any:
    return SegmentationWorker("w0", HungryFactory(cuda, weights_mb), None, memory_share=share)


def test_worker_is_capped_before_loading_and_backs_off_under_its_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = FakeCuda(10000)
    cuda.install(monkeypatch)
    w = worker(cuda, 1000)
    assert cuda.calls == [("fraction", 0.12, 0), ("load",)]
    # 1000 + 256 MB at 512 px is over the 1200 MB cap: an OOM of this worker, which halves its
    # input cap and retries at 256 px (64 MB).
    w.segment(np.zeros((512, 512, 3), np.uint8), "vessels")
    stats = w.stats()
    assert (stats["oom_retries"], stats["input_cap"], stats["forward_passes"]) == (1, 256, 1)
    assert stats["gpu_memory"] == {
        "worker": "w0",
        "planned_weights_mb": 1000,
        "planned_call_mb": 200,
        "planned_worker_mb": 1200,
        "memory_fraction": 0.12,
        "loaded_mb": 1000,
        "peak_call_mb": 64,
        "over_plan": [],
    }
    assert cuda.calls.count(("reset_peak", 0)) == 2  # once per model call, the failed one too
    assert ("empty_cache",) in cuda.calls
    # The per-worker figures leave the totals as they were.
    assert aggregate_stats([stats])["forward_passes"] == 1
    assert gpu_memory_lines([stats]) == [
        "w0: GPU memory 1000 MB loaded (plan 1000), peak per call +64 MB (plan +200): "
        "within the plan"
    ]


def test_a_worker_over_its_plan_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cuda = FakeCuda(10000)
    cuda.install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="orchestrator.inference.gpu_memory"):
        w = worker(cuda, 1100)
        for seed in range(2):
            w.segment(np.full((256, 256, 3), seed, np.uint8), "vessels")
    report = w.stats()["gpu_memory"]
    assert (report["loaded_mb"], report["peak_call_mb"]) == (1100, 64)
    assert report["over_plan"] == ["weights"]
    # Warned once, when the model had loaded (before any call), not again per call.
    assert [r.getMessage() for r in caplog.records] == [
        "w0: GPU memory 1100 MB loaded (plan 1000), peak per call +0 MB (plan +200): OVER THE "
        "PLAN (weights). The worker is capped at 1200 MB and lowers its input cap on OOM; set "
        "gpu.model_gb to the measured total to plan it right."
    ]
    assert describe(report).startswith(
        "w0: GPU memory 1100 MB loaded (plan 1000), peak per call +64"
    )


def test_without_a_share_or_cuda_nothing_is_capped_or_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = FakeCuda(10000)
    cuda.install(monkeypatch)
    w = worker(cuda, 1000, share=None)
    w.segment(np.zeros((64, 64, 3), np.uint8), "vessels")
    assert w.stats()["gpu_memory"] is None
    assert cuda.calls == [("load",)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    meter = GpuMeter("w1", SHARE)
    meter.cap()
    with meter.call():
        pass
    assert (meter.active, meter.report()) == (False, None)


def test_a_model_too_big_for_its_share_is_refused_while_loading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = FakeCuda(10000)
    cuda.install(monkeypatch)
    w = worker(cuda, 1300)  # over the 1200 MB cap: the load itself runs out of memory
    for ready in (w.factory_description, w.backend_id):
        with pytest.raises(UserError, match=r"^w0: out of GPU memory while loading the backend"):
            ready()
    with pytest.raises(UserError, match="capped at its planned share of 1200 MB"):
        w.factory_description()
