"""Cache warm-up on the whole worker pool: every (image, prompt) pair a run will ask for, each
computed once, with every worker kept busy until the last image.

How the work is spread:

- Each image goes to the worker :meth:`SegmentationClient.route` picks for it, so the trials'
  later requests find its answers in that worker's memory tier.
- Per image, first a ``lookup`` by digest (no image transfer; a warm cache ends there), then one
  ``segment_prompts`` call with the image and only the prompts not yet cached. The worker
  computes those back to back under its model lock.
- Each worker has at most ``window`` images in flight (default 2): while one is computed, the
  next is already waiting at the model lock, so a worker never idles for a round trip, and the
  driver holds no more than ``window`` requests per worker in Ray's object store.
- Results are awaited with ``ray.wait`` over every outstanding request, so whichever worker
  answers first gets its next image at once (and ``on_image`` reports progress as it happens).
- Hash routing is uneven on a few hundred images (one of four workers easily gets 25% more than
  its share). With ``share_work`` (the default), a worker whose own queue is empty takes the
  last image of the longest other queue. The answers reach the routed worker through the disk
  cache the pool shares (one ~1 ms read later instead of a forward pass); a pool without a disk
  cache should pass ``share_work=False``.

A worker that is restarting (``RayActorError``) gets the same request again, with back-off,
for up to the client's ``retry_timeout_s``; any other error of a request (e.g. a backend that
ran out of memory at its smallest input) is raised to the caller.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from models.segmentation import image_digest
from orchestrator.inference.client import SegmentationClient, SegmentationWorkerUnavailableError
from orchestrator.inference.worker import check_image

DEFAULT_WINDOW = 2
"""Images in flight per worker: one computing, one queued at its model lock."""


@dataclass(frozen=True)
class WarmUpReport:
    """What a warm-up did.

    Attributes:
        images: distinct images (by content) warmed.
        pairs: distinct (image, prompt) pairs asked.
        cached: pairs that were already cached (memory or disk).
        computed: pairs sent to a model.
        shared: images computed by a worker other than their routed one (``share_work``).
        images_per_worker: images each worker served, in worker order.
        seconds: wall time.
    """

    images: int
    pairs: int
    cached: int
    computed: int
    shared: int
    images_per_worker: tuple[int, ...]
    seconds: float


@dataclass
class _Job:
    image: np.ndarray
    digest: str
    missing: list[str] = field(default_factory=list)
    retry_deadline: float | None = None
    retry_delay: float = 0.05


def warm_up_pool(
    client: SegmentationClient,
    images: Iterable[np.ndarray],
    prompts: Sequence[str],
    *,
    window: int = DEFAULT_WINDOW,
    share_work: bool = True,
    on_image: Callable[[], None] | None = None,
) -> WarmUpReport:
    """Make sure the pool's cache holds every ``prompts`` answer for every image (uint8 HxWx3);
    see the module docstring for how the work is spread. ``on_image()`` is called once per
    image as soon as its answers are cached. Identical images are warmed once."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    start = time.monotonic()
    wanted = list(dict.fromkeys(str(p) for p in prompts))
    n_workers = len(client.worker_names)
    queues: list[deque[_Job]] = [deque() for _ in range(n_workers)]
    seen: set[str] = set()
    for image in images:
        check_image(image)
        digest = image_digest(image)
        if digest not in seen:
            seen.add(digest)
            queues[client.route(digest)].append(_Job(image, digest))
    pool = _Dispatch(client, queues, window, share_work)
    for worker in range(n_workers):
        pool.fill(worker, wanted)
    cached = computed = 0
    while pool.inflight:
        ready, _ = ray.wait(list(pool.inflight), num_returns=1)
        worker, job, phase = pool.inflight.pop(ready[0])
        try:
            answer = ray.get(ready[0])
        except RayActorError as err:
            pool.retry(worker, job, phase, wanted, err)
            continue
        if phase == "lookup":
            job.missing = [p for p, seg in zip(wanted, answer, strict=True) if seg is None]
            cached += len(wanted) - len(job.missing)
            if job.missing:
                pool.submit(worker, job, "segment_prompts", wanted)
                continue
        else:
            computed += len(job.missing)
        pool.finish(worker)
        if on_image is not None:
            on_image()
        pool.fill(worker, wanted)
    return WarmUpReport(
        images=len(seen),
        pairs=len(seen) * len(wanted),
        cached=cached,
        computed=computed,
        shared=pool.shared,
        images_per_worker=tuple(pool.served),
        seconds=time.monotonic() - start,
    )


class _Dispatch:
    """The queues, the in-flight requests and each worker's free slots of one warm-up."""

    def __init__(
        self,
        client: SegmentationClient,
        queues: list[deque[_Job]],
        window: int,
        share_work: bool,
    ) -> None:
        self.client = client
        self.queues = queues
        self.window = window
        self.share_work = share_work
        self.inflight: dict[Any, tuple[int, _Job, str]] = {}
        self.busy = [0] * len(queues)
        self.served = [0] * len(queues)
        self.shared = 0

    def fill(self, worker: int, prompts: list[str]) -> None:
        """Give ``worker`` images until its window is full or no work is left for it."""
        while self.busy[worker] < self.window:
            job = self._take(worker)
            if job is None:
                return
            self.busy[worker] += 1
            self.submit(worker, job, "lookup", prompts)

    def finish(self, worker: int) -> None:
        self.busy[worker] -= 1
        self.served[worker] += 1

    def submit(self, worker: int, job: _Job, phase: str, prompts: list[str]) -> None:
        handle = self.client.handle(worker)
        if phase == "lookup":
            hw = (int(job.image.shape[0]), int(job.image.shape[1]))
            ref = handle.lookup.remote(job.digest, hw, prompts)
        else:
            ref = handle.segment_prompts.remote(job.image, job.missing)
        self.inflight[ref] = (worker, job, phase)

    def retry(
        self, worker: int, job: _Job, phase: str, prompts: list[str], err: BaseException
    ) -> None:
        """Send a request again after its worker failed to answer (it may be restarting)."""
        now = time.monotonic()
        if job.retry_deadline is None:
            job.retry_deadline = now + self.client.retry_timeout_s
        name = self.client.worker_names[worker]
        if now + job.retry_delay > job.retry_deadline:
            raise SegmentationWorkerUnavailableError(
                f"cache warm-up: segmentation worker {name!r} did not answer within "
                f"{self.client.retry_timeout_s:.0f} s (last error: {type(err).__name__}: "
                f"{err}). Check its log (`ray list actors`, dashboard)."
            ) from err
        self.client.forget_handle(worker)
        time.sleep(job.retry_delay)
        job.retry_delay = min(job.retry_delay * 2, 5.0)
        self.submit(worker, job, phase, prompts)

    def _take(self, worker: int) -> _Job | None:
        if self.queues[worker]:
            return self.queues[worker].popleft()
        if not self.share_work:
            return None
        longest = max(range(len(self.queues)), key=lambda i: len(self.queues[i]))
        if not self.queues[longest]:
            return None
        self.shared += 1
        return self.queues[longest].pop()
