"""Counters, queue length and latency percentiles of the segmentation workers.

Every worker keeps a :class:`WorkerStats`: plain counters returned by ``stats()`` (for the run
summary) and, inside Ray, the same figures exported with ``ray.util.metrics`` under the tag
``worker`` (visible on the dashboard's metrics page once Prometheus scrapes Ray):

- counters ``sa2va_segmentation_<name>`` for every name in :data:`COUNTERS`,
- gauges ``sa2va_segmentation_queue_length`` (requests inside the worker, waiting for or holding
  the model), ``sa2va_segmentation_restarts`` and ``sa2va_segmentation_input_cap_px``,
- histogram ``sa2va_segmentation_model_latency_ms`` (one observation per forward pass).

Counters are per worker incarnation: a restarted worker starts again from zero (Prometheus treats
that as a counter reset) and reports ``restarts``.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

COUNTERS = (
    "requests",
    "forward_passes",
    "memory_hits",
    "disk_hits",
    "cache_misses",
    "corrupt_entries",
    "disk_read_errors",
    "disk_write_errors",
    "oom_retries",
    "oom_failures",
    "model_errors",
)
"""Monotonic per-incarnation counts; ``aggregate_stats`` sums them over workers."""

LATENCY_WINDOW = 1024
"""How many of the latest forward-pass latencies the percentiles are computed from."""

LATENCY_BOUNDARIES_MS = [
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    200.0,
    400.0,
    800.0,
    1600.0,
    3200.0,
    6400.0,
    12800.0,
]


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 100]) of ``values``; ``None`` when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


class _RayExport:
    """The ``ray.util.metrics`` objects of one worker (created only inside a Ray worker)."""

    def __init__(self, worker: str) -> None:
        from ray.util import metrics

        tags = ("worker",)
        self.tags = {"worker": worker}
        self.counters = {
            name: metrics.Counter(f"sa2va_segmentation_{name}", f"segmentation {name}", tags)
            for name in COUNTERS
        }
        self.queue = metrics.Gauge("sa2va_segmentation_queue_length", "requests in flight", tags)
        self.restarts = metrics.Gauge("sa2va_segmentation_restarts", "worker restarts", tags)
        self.cap = metrics.Gauge("sa2va_segmentation_input_cap_px", "backend input cap", tags)
        self.latency = metrics.Histogram(
            "sa2va_segmentation_model_latency_ms",
            "latency of one forward pass",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=tags,
        )


class WorkerStats:
    """Thread-safe statistics of one worker incarnation.

    Args:
        worker: the worker's name (the ``worker`` tag).
        restarts: how many times this worker was restarted before this incarnation.
        export: also export to ``ray.util.metrics`` (only inside a Ray worker).
    """

    def __init__(self, worker: str, restarts: int = 0, export: bool = False) -> None:
        self.worker = worker
        self.restarts = restarts
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.in_flight = 0
        self.input_cap: int | None = None
        self._latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._lock = threading.Lock()
        self._ray = _RayExport(worker) if export else None
        if self._ray is not None:
            self._ray.restarts.set(restarts, tags=self._ray.tags)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (one of :data:`COUNTERS`)."""
        if n == 0:
            return
        with self._lock:
            self.counts[name] += n
        self._export({name: n})

    def sync_counts(self, totals: Mapping[str, int]) -> None:
        """Raise counters to ``totals`` (counts kept elsewhere, e.g. by the cache)."""
        with self._lock:  # read and update together: concurrent syncs must not add twice
            deltas = {n: t - self.counts[n] for n, t in totals.items() if n in self.counts}
            for name, delta in deltas.items():
                self.counts[name] += delta
        self._export(deltas)

    def _export(self, deltas: Mapping[str, int]) -> None:
        if self._ray is None:
            return
        for name, delta in deltas.items():
            if delta > 0:
                self._ray.counters[name].inc(delta, tags=self._ray.tags)

    def forward_pass(self, latency_s: float) -> None:
        """Record one successful model call and its latency."""
        latency_ms = latency_s * 1000.0
        with self._lock:
            self._latencies_ms.append(latency_ms)
        self.count("forward_passes")
        if self._ray is not None:
            self._ray.latency.observe(latency_ms, tags=self._ray.tags)

    def request_started(self) -> None:
        self._add_in_flight(+1)

    def request_finished(self) -> None:
        self._add_in_flight(-1)

    def set_input_cap(self, cap: int | None) -> None:
        self.input_cap = cap
        if self._ray is not None and cap is not None:
            self._ray.cap.set(cap, tags=self._ray.tags)

    def snapshot(self) -> dict[str, Any]:
        """All figures as a flat dict of plain values."""
        with self._lock:
            latencies = list(self._latencies_ms)
            snap: dict[str, Any] = dict(self.counts)
            snap["queue_length"] = self.in_flight
        snap.update(
            worker=self.worker,
            restarts=self.restarts,
            input_cap=self.input_cap,
            latency_ms_p50=percentile(latencies, 50),
            latency_ms_p95=percentile(latencies, 95),
        )
        return snap

    def _add_in_flight(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta
            value = self.in_flight
        if self._ray is not None:
            self._ray.queue.set(value, tags=self._ray.tags)


def aggregate_stats(per_worker: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Totals over workers: counters, queue length and restarts summed; latency percentiles are
    the worst worker's (``latency_ms_p50_worst``, ``latency_ms_p95_worst``)."""
    total: dict[str, Any] = {name: sum(int(s[name]) for s in per_worker) for name in COUNTERS}
    total["queue_length"] = sum(int(s["queue_length"]) for s in per_worker)
    total["restarts"] = sum(int(s["restarts"]) for s in per_worker)
    # Images are routed to one worker by hash, so workers serve disjoint pairs.
    total["distinct_pairs"] = sum(int(s.get("distinct_pairs", 0)) for s in per_worker)
    for q in ("p50", "p95"):
        values = [s[f"latency_ms_{q}"] for s in per_worker if s[f"latency_ms_{q}"] is not None]
        total[f"latency_ms_{q}_worst"] = max(values) if values else None
    total["workers"] = len(per_worker)
    return total
