"""The client of the segmentation worker pool: ``SegmentationClient``.

Typical use (driver; ``start_workers`` is in :mod:`orchestrator.inference.pool`)::

    names = start_workers(2, BackendSpec("frangi"), cache_dir="~/.cache/sa2va_rl/segmentations")
    client = SegmentationClient(names)        # picklable: hand it to envs via env_config
    seg = client.segment(image, prompt)       # satisfies models.segmentation.Segmenter
    print(client.stats()["total"])            # forward passes, cache hits, p95 latency, ...
    shutdown_workers(names)                   # or let non-detached workers die with the driver

The client routes every image to one worker by its content hash (so that worker's memory cache is
warm for it), keeps a small local memo (repeat steps on the same image cost no round trip),
sends all prompts of one image in one call with ``segment_prompts``, and retries transparently
while a worker restarts (Ray restarts crashed workers and re-runs their pending requests; the
client re-resolves the handle, backs off and gives up with a clear error after
``retry_timeout_s``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from models.errors import UserError
from models.segmentation import Segmentation, image_digest
from orchestrator.inference.stats import aggregate_stats
from orchestrator.inference.worker import check_image

log = logging.getLogger(__name__)

NAMESPACE = "sa2va_rl"
"""The Ray namespace of the worker pool."""


class SegmentationWorkerUnavailableError(RuntimeError):
    """A worker did not answer within the client's retry budget, or does not exist."""


class SegmentationClient:
    """A Segmenter backed by the shared worker pool (see the module docstring).

    Picklable: it holds worker names, not handles, and resolves handles lazily in whichever
    process uses it. Returned arrays are read-only (shared with the memo and Ray's object
    store): copy before modifying a mask in place. Errors of one request (e.g.
    :class:`~orchestrator.inference.worker.SegmentationOutOfMemoryError`) are raised to its
    caller; the worker keeps serving.

    Args:
        worker_names: the names ``start_workers`` returned.
        namespace: the workers' Ray namespace.
        memo_entries: size of the local LRU of recent answers (0 disables it).
        retry_timeout_s: how long one request may wait for a restarting worker before failing
            with :class:`SegmentationWorkerUnavailableError` (a Sa2VA reload takes minutes).
    """

    def __init__(
        self,
        worker_names: Sequence[str],
        *,
        namespace: str = NAMESPACE,
        memo_entries: int = 64,
        retry_timeout_s: float = 600.0,
    ) -> None:
        if not worker_names:
            raise UserError("SegmentationClient needs at least one worker name (start_workers)")
        self.worker_names = list(worker_names)
        self.namespace = namespace
        self.memo_entries = memo_entries
        self.retry_timeout_s = retry_timeout_s
        self._init_local_state()

    def _init_local_state(self) -> None:
        self._handles: dict[int, Any] = {}
        self._memo: OrderedDict[tuple[str, str], Segmentation] = OrderedDict()
        self._memo_hits = self._memo_misses = self._retries = 0
        self._backend_id: str | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "worker_names": self.worker_names,
            "namespace": self.namespace,
            "memo_entries": self.memo_entries,
            "retry_timeout_s": self.retry_timeout_s,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_local_state()

    def __repr__(self) -> str:
        return f"SegmentationClient({self.worker_names!r}, namespace={self.namespace!r})"

    @property
    def backend_id(self) -> str:
        """The pool's backend id (asked once; all workers must agree)."""
        if self._backend_id is None:
            ids = [self._call(i, "backend_id") for i in range(len(self.worker_names))]
            if len(set(ids)) != 1:
                raise UserError(
                    f"segmentation workers disagree on the backend: "
                    f"{dict(zip(self.worker_names, ids, strict=True))}; restart the pool"
                )
            self._backend_id = ids[0]
        return self._backend_id

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        """The segmentation of ``image`` (uint8 HxWx3 RGB) for ``prompt``."""
        return self.segment_prompts(image, [prompt])[0]

    def segment_prompts(self, image: np.ndarray, prompts: Sequence[str]) -> list[Segmentation]:
        """The segmentations of one image for several prompts, in order, in one worker call."""
        check_image(image)
        digest = image_digest(image)
        results: dict[str, Segmentation] = {}
        for prompt in prompts:
            memo = self._memo_get((digest, prompt))
            if memo is not None:
                results[prompt] = memo
        missing = list(dict.fromkeys(p for p in prompts if p not in results))
        if missing:
            worker = self._route(digest)
            # Ask by digest first: a cached answer then costs no image transfer; only what is
            # not cached travels with the image (one more round trip, next to a forward pass).
            hw = (int(image.shape[0]), int(image.shape[1]))
            cached = self._call(worker, "lookup", digest, hw, missing)
            computed = [p for p, seg in zip(missing, cached, strict=True) if seg is None]
            if computed:
                fresh = iter(self._call(worker, "segment_prompts", image, computed))
                cached = [next(fresh) if seg is None else seg for seg in cached]
            for prompt, seg in zip(missing, cached, strict=True):
                results[prompt] = seg
                self._memo_put((digest, prompt), seg)
        return [results[p] for p in prompts]

    def stats(self) -> dict[str, Any]:
        """``{"total": ..., "workers": [...], "client": ...}``: summed worker counters (forward
        passes, memory/disk hits, corrupt entries, OOM retries/failures, restarts, queue length,
        worst p50/p95 latency), each worker's own figures, and this client's memo figures."""
        per_worker = [self._call(i, "stats") for i in range(len(self.worker_names))]
        with self._lock:
            client = {
                "memo_hits": self._memo_hits,
                "memo_misses": self._memo_misses,
                "memo_entries": len(self._memo),
                "retries": self._retries,
            }
        return {"total": aggregate_stats(per_worker), "workers": per_worker, "client": client}

    def _route(self, digest: str) -> int:
        return int(digest[:16], 16) % len(self.worker_names)

    def _memo_get(self, key: tuple[str, str]) -> Segmentation | None:
        with self._lock:
            seg = self._memo.get(key)
            if seg is None:
                self._memo_misses += 1
                return None
            self._memo.move_to_end(key)
            self._memo_hits += 1
            return seg

    def _memo_put(self, key: tuple[str, str], seg: Segmentation) -> None:
        if self.memo_entries <= 0:
            return
        with self._lock:
            self._memo[key] = seg
            while len(self._memo) > self.memo_entries:
                self._memo.popitem(last=False)

    def _call(self, index: int, method: str, *args: Any) -> Any:
        """Call ``method`` on worker ``index``; retry with back-off while it restarts."""
        deadline = time.monotonic() + self.retry_timeout_s
        delay = 0.05
        attempts = 0
        while True:
            attempts += 1
            handle = self._handle(index)
            try:
                return ray.get(getattr(handle, method).remote(*args))
            except RayActorError as err:  # includes ActorDiedError and ActorUnavailableError
                if time.monotonic() + delay > deadline:
                    raise self._unavailable(index, attempts, err) from err
                log.warning("%s unavailable (%s); retrying", self.worker_names[index], err)
                with self._lock:
                    self._retries += 1
                    self._handles.pop(index, None)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _handle(self, index: int) -> Any:
        with self._lock:
            handle = self._handles.get(index)
        if handle is not None:
            return handle
        name = self.worker_names[index]
        try:
            handle = ray.get_actor(name, namespace=self.namespace)
        except ValueError:
            raise SegmentationWorkerUnavailableError(
                f"segmentation worker {name!r} does not exist in Ray namespace "
                f"{self.namespace!r}: start the pool with start_workers(...) first, and keep "
                "the driver that started non-detached workers alive (they die with it)."
            ) from None
        with self._lock:
            self._handles[index] = handle
        return handle

    def _unavailable(
        self, index: int, attempts: int, err: BaseException
    ) -> SegmentationWorkerUnavailableError:
        name = self.worker_names[index]
        return SegmentationWorkerUnavailableError(
            f"segmentation worker {name!r} did not answer within {self.retry_timeout_s:.0f} s "
            f"({attempts} attempts; last error: {type(err).__name__}: {err}). Check its log "
            "(`ray list actors`, dashboard), or raise retry_timeout_s if its model loads slowly."
        )
