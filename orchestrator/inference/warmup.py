"""Cache warm-up on the whole worker pool: every (image, prompt) pair a run will ask for, each
computed once, with every worker kept busy until the last image.

How the work is spread:

- Each image goes to the worker :meth:`SegmentationClient.route` picks for it, so the trials'
  later requests find its answers in that worker's memory tier, in one ``serve`` call per image
  (cached answers by digest; only a miss fetches the pixels, and the worker computes an image's
  missing prompts back to back under its model lock).
- Each worker has ``window`` requests in flight (default 2), each a driver thread blocked on
  its answer: while one image is computed the next already waits at the model lock, so a
  worker never idles for a round trip, and the driver holds at most ``window`` images per
  worker in Ray's object store. Whichever request finishes, its thread takes that worker's next
  image at once and ``on_image`` reports progress as it happens.
- Hash routing is uneven on a few hundred images (one of four workers easily gets 25% more than
  its share). With ``share_work`` (the default) a worker whose own queue is empty takes the last
  image of the longest other queue; the answers reach the routed worker through the disk cache
  the pool shares (one ~1 ms read later instead of a forward pass). A pool without a disk cache
  should pass ``share_work=False``.

Requests go through the client (:meth:`SegmentationClient.serve_on`): the same transports
(Ray actors or in-process workers) and the same retries while a worker restarts; any other
error of a request (e.g. a backend out of memory at its smallest input) stops the warm-up and
is raised to the caller.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from models.segmentation import image_digest
from orchestrator.inference.backend_spec import check_image
from orchestrator.inference.client import SegmentationClient

DEFAULT_WINDOW = 2
"""Requests in flight per worker: one image computing, the next queued at its model lock."""


@dataclass(frozen=True)
class WarmUpReport:
    """What a warm-up did.

    Attributes:
        images: distinct images (by content) warmed.
        pairs: distinct (image, prompt) pairs asked.
        computed: forward passes the pool ran meanwhile (the pairs that were not cached).
        shared: images served by a worker other than their routed one (``share_work``).
        images_per_worker: images each worker served, in worker order.
        seconds: wall time.
    """

    images: int
    pairs: int
    computed: int
    shared: int
    images_per_worker: tuple[int, ...]
    seconds: float

    @property
    def cached(self) -> int:
        """Pairs that were already cached (memory or disk)."""
        return max(0, self.pairs - self.computed)


def warm_up_pool(
    client: SegmentationClient,
    images: Iterable[np.ndarray],
    prompts: Sequence[str],
    *,
    window: int = DEFAULT_WINDOW,
    share_work: bool = True,
    on_image: Callable[[], None] | None = None,
) -> WarmUpReport:
    """Make sure the pool's cache holds every ``prompts`` answer of every image (uint8 HxWx3);
    see the module docstring for how the work is spread. ``on_image()`` is called once per
    image (from a driver thread, one call at a time) as soon as its answers are cached.
    Identical images are warmed once."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    start = time.monotonic()
    wanted = list(dict.fromkeys(str(p) for p in prompts))
    n_workers = len(client.worker_names)
    queues = _Queues(n_workers, share_work)
    for image in images:
        check_image(image)
        digest = image_digest(image)
        queues.add(client.route(digest), digest, image)
    passes_before = _forward_passes(client)
    report_lock = threading.Lock()
    stop = threading.Event()

    def serve_worker(worker: int) -> None:
        while not stop.is_set():
            job = queues.take(worker)
            if job is None:
                return
            digest, image = job
            try:
                client.serve_on(worker, digest, image, wanted)
            except BaseException:
                stop.set()  # the other threads finish their current image and stop
                raise
            with report_lock:
                if on_image is not None:
                    on_image()

    with ThreadPoolExecutor(n_workers * window, thread_name_prefix="warm-up") as threads:
        futures = [threads.submit(serve_worker, w) for w in range(n_workers) for _ in range(window)]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            future.result()  # re-raises the first request's error
    return WarmUpReport(
        images=queues.images,
        pairs=queues.images * len(wanted),
        computed=_forward_passes(client) - passes_before,
        shared=queues.shared,
        images_per_worker=tuple(queues.served),
        seconds=time.monotonic() - start,
    )


def _forward_passes(client: SegmentationClient) -> int:
    return int(client.stats()["total"]["forward_passes"])


class _Queues:
    """Each worker's images (in routing order) and the work-sharing rule, behind one lock."""

    def __init__(self, n_workers: int, share_work: bool) -> None:
        self.queues: list[deque[tuple[str, np.ndarray]]] = [deque() for _ in range(n_workers)]
        self.share_work = share_work
        self.served = [0] * n_workers
        self.shared = 0
        self.images = 0
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def add(self, worker: int, digest: str, image: np.ndarray) -> None:
        if digest not in self._seen:
            self._seen.add(digest)
            self.queues[worker].append((digest, image))
            self.images += 1

    def take(self, worker: int) -> tuple[str, np.ndarray] | None:
        """``worker``'s next image, else (sharing) the last of the longest queue, else None."""
        with self._lock:
            if self.queues[worker]:
                self.served[worker] += 1
                return self.queues[worker].popleft()
            if not self.share_work:
                return None
            longest = max(self.queues, key=len)
            if not longest:
                return None
            self.served[worker] += 1
            self.shared += 1
            return longest.pop()
