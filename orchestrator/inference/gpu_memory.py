"""A segmentation worker's GPU memory: held to its planned share, measured against the plan.

The GPU plan (:mod:`orchestrator.gpu.budget`) gives each worker a share of its GPU
(:class:`MemoryShare`: the weights and, on top, the activations at its input cap). The worker
(:class:`GpuMeter`):

- caps its CUDA caching allocator at that share before the model loads
  (``torch.cuda.set_per_process_memory_fraction``), so a worker that needs more than planned
  raises ``torch.OutOfMemoryError`` in its own process, where the worker's OOM back-off lowers
  its input cap and retries, instead of taking memory its GPU's other users were promised. The
  cap counts what the allocator holds; the CUDA context (a few hundred MB, part of the plan's
  activation figure) comes on top;
- measures what the loaded model holds (``torch.cuda.memory_allocated``) and, per model call,
  the peak above what was held before it (``max_memory_allocated`` after
  ``reset_peak_memory_stats``), keeping the largest;
- reports both next to the plan's figures (:meth:`GpuMeter.report`, in the worker's ``stats``
  and the run's ``summary.json``) and logs a warning the first time either exceeds the plan.

Without a share (CPU backends, no plan) or without CUDA the meter does nothing and reports
None. torch is looked up only when a share is given.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

BYTES_PER_MB = 2**20


@dataclass(frozen=True)
class MemoryShare:
    """One worker's share of its GPU, in MB: ``weights_mb`` (the model once loaded) and
    ``worker_mb`` (weights plus the activations of one call at the planned input cap)."""

    weights_mb: int
    worker_mb: int

    @property
    def activation_mb(self) -> int:
        """MB planned for one call on top of the weights."""
        return self.worker_mb - self.weights_mb


class GpuMeter:
    """Caps and measures the current CUDA device of a worker holding ``share`` (see module)."""

    def __init__(self, name: str, share: MemoryShare | None) -> None:
        self.name = name
        self.share = share
        self._torch = _cuda_torch() if share is not None else None
        self._device: int | None = None
        self.fraction: float | None = None
        self.loaded_mb: int | None = None
        self.peak_call_mb = 0
        self._warned: set[str] = set()

    @property
    def active(self) -> bool:
        return self._torch is not None

    def cap(self) -> None:
        """Limit this process's allocator on the current device to the share (call before the
        model loads)."""
        if self._torch is None or self.share is None:
            return
        cuda = self._torch.cuda
        self._device = int(cuda.current_device())
        total = int(cuda.get_device_properties(self._device).total_memory)
        self.fraction = min(1.0, self.share.worker_mb * BYTES_PER_MB / total)
        cuda.set_per_process_memory_fraction(self.fraction, self._device)

    def record_loaded(self) -> None:
        """Measure what the loaded model holds."""
        if self._torch is None:
            return
        self.loaded_mb = _mb(self._torch.cuda.memory_allocated(self._device))
        self._check()

    @contextmanager
    def call(self) -> Iterator[None]:
        """Measure the peak of one model call above what was held before it."""
        if self._torch is None:
            yield
            return
        cuda = self._torch.cuda
        cuda.reset_peak_memory_stats(self._device)
        before = int(cuda.memory_allocated(self._device))
        try:
            yield
        finally:
            peak = _mb(int(cuda.max_memory_allocated(self._device)) - before)
            self.peak_call_mb = max(self.peak_call_mb, peak)
            self._check()

    def report(self) -> dict[str, Any] | None:
        """The plan's figures and the measured ones (MB), or None when nothing is measured."""
        if self._torch is None or self.share is None:
            return None
        return {
            "worker": self.name,
            "planned_weights_mb": self.share.weights_mb,
            "planned_call_mb": self.share.activation_mb,
            "planned_worker_mb": self.share.worker_mb,
            "memory_fraction": None if self.fraction is None else round(self.fraction, 4),
            "loaded_mb": self.loaded_mb,
            "peak_call_mb": self.peak_call_mb,
            "over_plan": self.over_plan(),
        }

    def over_plan(self) -> list[str]:
        """Which measured figures exceed the plan: ``weights``, ``worker`` (weights + peak)."""
        if self.share is None or self.loaded_mb is None:
            return []
        over = []
        if self.loaded_mb > self.share.weights_mb:
            over.append("weights")
        if self.loaded_mb + self.peak_call_mb > self.share.worker_mb:
            over.append("worker")
        return over

    def _check(self) -> None:
        for what in self.over_plan():
            if what not in self._warned:
                self._warned.add(what)
                log.warning("%s", describe(self.report() or {}))


def describe(report: dict[str, Any]) -> str:
    """One line: measured against planned, and what to do when over the plan."""
    line = (
        f"{report['worker']}: GPU memory {report['loaded_mb']} MB loaded (plan "
        f"{report['planned_weights_mb']}), peak per call +{report['peak_call_mb']} MB (plan "
        f"+{report['planned_call_mb']})"
    )
    if not report["over_plan"]:
        return line + ": within the plan"
    return (
        f"{line}: OVER THE PLAN ({', '.join(report['over_plan'])}). The worker is capped at "
        f"{report['planned_worker_mb']} MB and lowers its input cap on OOM; set gpu.model_gb "
        "to the measured total to plan it right."
    )


def _cuda_torch() -> Any:
    import torch

    return torch if torch.cuda.is_available() else None


def _mb(n_bytes: int) -> int:
    return -(-int(n_bytes) // BYTES_PER_MB)
