"""The client of the segmentation worker pool: ``SegmentationClient``.

Typical use (driver; ``start_workers`` is in :mod:`orchestrator.inference.pool`)::

    names = start_workers(2, BackendSpec("frangi"), cache_dir="~/.cache/sa2va_rl/segmentations")
    client = SegmentationClient(names)        # picklable: hand it to envs via env_config
    seg = client.segment(image, prompt)       # satisfies models.segmentation.Segmenter
    print(client.stats()["total"])            # forward passes, cache hits, p95 latency, ...
    shutdown_workers(names)                   # or let non-detached workers die with the driver

    local = SegmentationClient.in_process([SegmentationWorker("w0", BackendSpec("frangi"))])

The client hashes each image once, routes it to one worker by that hash (so that worker's
memory cache is warm for it), keeps a small local memo (repeat steps on the same image cost no
round trip), and asks for all missing prompts of one image in one ``serve`` call: the worker
answers from its cache by digest and computes only what is missing. It reaches workers through a
:class:`~orchestrator.inference.transport.WorkerTransport` (Ray actors or in-process objects)
and retries while a worker restarts (Ray restarts a crashed worker; the client backs off and
sends the request again). Every failure is bounded: a worker that stays unreachable fails the
request after ``retry_timeout_s`` (:class:`SegmentationWorkerUnavailableError`); a request
during which its worker died :data:`MAX_CRASHES` times, or that had no answer within
``call_timeout_s``, fails with :class:`SegmentationRequestError` naming the image (digest and
size) and prompts, instead of killing its worker forever or hanging.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from models.errors import UserError
from models.segmentation import Segmentation, image_digest
from orchestrator.inference.backend_spec import check_image
from orchestrator.inference.stats import aggregate_stats
from orchestrator.inference.transport import (
    CALL_TIMEOUT_S,
    NAMESPACE,
    InProcessTransport,
    RayTransport,
    SegmentationRequestError,
    SegmentationWorkerUnavailableError,
    WorkerCrashed,
    WorkerTimedOut,
    WorkerTransport,
    WorkerUnavailable,
)
from orchestrator.inference.worker import SegmentationWorker

log = logging.getLogger(__name__)

__all__ = [
    "NAMESPACE",
    "SegmentationClient",
    "SegmentationRequestError",
    "SegmentationWorkerUnavailableError",
]

T = TypeVar("T")
MAX_CRASHES = 3
"""Deaths of its worker one request may see before it fails (the request likely kills it)."""


class SegmentationClient:
    """A Segmenter backed by the shared worker pool (see the module docstring).

    Picklable over Ray workers: it holds worker names, not handles, and resolves handles lazily
    in whichever process uses it. Returned arrays are read-only (shared with the memo and Ray's
    object store): copy before modifying a mask in place. Errors of one request (e.g.
    :class:`~orchestrator.inference.worker.SegmentationOutOfMemoryError`) are raised to its
    caller; the worker keeps serving.

    Args:
        workers: the names ``start_workers`` returned (Ray actors), or transports.
        namespace: the Ray workers' namespace.
        memo_entries: size of the local LRU of recent answers (0 disables it).
        retry_timeout_s: how long one request may wait for a restarting worker before failing
            with :class:`SegmentationWorkerUnavailableError` (a Sa2VA reload takes minutes).
        call_timeout_s: how long one Ray call may wait for its answer before the request
            fails with :class:`SegmentationRequestError`.
    """

    def __init__(
        self,
        workers: Sequence[str | WorkerTransport],
        *,
        namespace: str = NAMESPACE,
        memo_entries: int = 64,
        retry_timeout_s: float = 600.0,
        call_timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        if not workers:
            raise UserError("SegmentationClient needs at least one worker name (start_workers)")
        self.transports: list[WorkerTransport] = [
            RayTransport(w, namespace, call_timeout_s) if isinstance(w, str) else w for w in workers
        ]
        self.namespace = namespace
        self.memo_entries = memo_entries
        self.retry_timeout_s = retry_timeout_s
        self._init_local_state()

    @classmethod
    def for_run(cls, run_id: str, **options: Any) -> SegmentationClient:
        """A client over the workers run ``run_id`` has now (found by name, however many the
        current attempt started; see :func:`orchestrator.inference.pool.run_workers`)."""
        from orchestrator.inference.pool import run_workers

        namespace = options.get("namespace", NAMESPACE)
        return cls(run_workers(run_id, namespace), **options)

    @classmethod
    def in_process(
        cls, workers: Sequence[SegmentationWorker], **options: Any
    ) -> SegmentationClient:
        """A client over worker objects in this process (no Ray)."""
        return cls([InProcessTransport(w) for w in workers], **options)

    @property
    def worker_names(self) -> list[str]:
        return [t.name for t in self.transports]

    def _init_local_state(self) -> None:
        self._memo: OrderedDict[tuple[str, str], Segmentation] = OrderedDict()
        self._memo_hits = self._memo_misses = self._retries = 0
        self._backend_id: str | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "transports": self.transports,
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
            ids = [self._call(i, lambda t: t.backend_id()) for i in range(len(self.transports))]
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
            worker = self.route(digest)
            what = _describe_request(digest, image, missing)
            answers = self._call(worker, lambda t: t.serve(digest, image, missing), what)
            for prompt, seg in zip(missing, answers, strict=True):
                results[prompt] = seg
                self._memo_put((digest, prompt), seg)
        return [results[p] for p in prompts]

    def head_inputs(self, image: np.ndarray, prompts: Sequence[str]) -> list[Any]:
        """The frozen inputs (:class:`models.heads.FrozenInputs`) of ``image`` for each prompt,
        in order, from the worker that serves the image (the model lives there), with the
        client's retries; no memo (a caller asks for an image's inputs once)."""
        check_image(image)
        digest = image_digest(image)
        what = "head inputs of " + _describe_request(digest, image, prompts)
        return self._call(
            self.route(digest), lambda t: t.head_inputs(digest, image, list(prompts)), what
        )

    def initial_head(self) -> Any:
        """A fresh :class:`models.heads.MaskHead` of the pool's backend (from its first
        worker; every worker loads the same weights)."""
        return self._call(0, lambda t: t.initial_head(), "the initial mask head")

    def stats(self, *, union_pairs: bool = False) -> dict[str, Any]:
        """``{"total": ..., "workers": [...], "client": ...}``: summed worker counters (forward
        passes, memory/disk hits, corrupt entries, OOM retries/failures, restarts, queue length,
        worst p50/p95 latency), each worker's own figures, and this client's memo figures.

        ``total["distinct_pairs"]`` sums the workers' counts, which overlap where the warm-up
        shared work between workers; ``union_pairs`` asks every worker for its pairs and counts
        their union instead (exact, one larger transfer: for a run's summary)."""
        per_worker = [self._call(i, lambda t: t.stats()) for i in range(len(self.transports))]
        with self._lock:
            client = {
                "memo_hits": self._memo_hits,
                "memo_misses": self._memo_misses,
                "memo_entries": len(self._memo),
                "retries": self._retries,
            }
        total = aggregate_stats(per_worker)
        if union_pairs:
            served: set[tuple[str, str]] = set()
            for i in range(len(self.transports)):
                served.update(self._call(i, lambda t: t.served_pairs()))
            total["distinct_pairs"] = len(served)
        return {"total": total, "workers": per_worker, "client": client}

    def route(self, digest: str) -> int:
        """Index of the worker that serves the image of ``digest`` (``image_digest``)."""
        return int(digest[:16], 16) % len(self.transports)

    def serve_on(
        self, index: int, digest: str, image: np.ndarray, prompts: Sequence[str]
    ) -> list[Segmentation]:
        """``prompts`` of ``image`` (whose ``image_digest`` is ``digest``) from worker ``index``,
        whichever worker routing would pick, with the client's retries and no memo (the cache
        warm-up spreads work this way; the answers are the same from any worker of the pool)."""
        what = _describe_request(digest, image, prompts)
        return self._call(index, lambda t: t.serve(digest, image, list(prompts)), what)

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

    def _call(
        self, index: int, request: Callable[[WorkerTransport], T], what: str = "a request"
    ) -> T:
        """``request`` (described by ``what``) on worker ``index``; retry with back-off while
        the worker is unavailable, at most :data:`MAX_CRASHES` deaths of it and until
        ``retry_timeout_s``."""
        transport = self.transports[index]
        deadline = time.monotonic() + self.retry_timeout_s
        delay = 0.05
        attempts = crashes = 0
        while True:
            attempts += 1
            try:
                return request(transport)
            except WorkerTimedOut as err:
                raise SegmentationRequestError(
                    f"{what} on segmentation worker {transport.name!r}: {err}. The worker may "
                    "hang (see its log: `ray list actors`, the dashboard)."
                ) from None
            except WorkerUnavailable as err:
                crashes += isinstance(err, WorkerCrashed)
                if crashes >= MAX_CRASHES:
                    raise SegmentationRequestError(
                        f"{what}: segmentation worker {transport.name!r} died {crashes} times "
                        f"while serving it (last: {err}). This request crashes the worker; see "
                        "the worker's log, and leave the image out of the data if it is broken."
                    ) from err
                if time.monotonic() + delay > deadline:
                    raise self._unavailable(index, attempts, err) from err
                log.warning("%s unavailable (%s); retrying", transport.name, err)
                with self._lock:
                    self._retries += 1
                transport.reset()
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _unavailable(
        self, index: int, attempts: int, err: BaseException
    ) -> SegmentationWorkerUnavailableError:
        name = self.worker_names[index]
        return SegmentationWorkerUnavailableError(
            f"segmentation worker {name!r} did not answer within {self.retry_timeout_s:.0f} s "
            f"({attempts} attempts; last error: {err}). Check its log (`ray list actors`, "
            "dashboard), or raise retry_timeout_s if its model loads slowly."
        )


def _describe_request(digest: str, image: np.ndarray, prompts: Sequence[str]) -> str:
    """``image 0123456789ab (512x512), prompts ['...']`` for error messages (the digest's
    start: ``image_digest`` of the file's pixels)."""
    size = f"{image.shape[1]}x{image.shape[0]}"
    return f"image {digest[:12]} ({size}), prompts {list(prompts)}"
