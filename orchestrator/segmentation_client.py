"""The segmentation worker pool: ``start_workers``/``shutdown_workers`` and ``SegmentationClient``.

Typical use (driver)::

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from models.errors import UserError
from models.segmentation import Segmentation, image_digest
from orchestrator.inference_cache import DEFAULT_MEMORY_BYTES
from orchestrator.inference_stats import aggregate_stats
from orchestrator.segmentation_worker import (
    DEFAULT_MIN_INPUT_CAP,
    BackendFactory,
    SegmentationWorker,
    check_image,
    describe_factory,
)

log = logging.getLogger(__name__)

NAMESPACE = "sa2va_rl"
WORKER_NAME_PREFIX = "segmentation-worker"
DEFAULT_MAX_CONCURRENCY = 8
"""Requests inside one worker at once: cache hits are served while another request holds the
model; the model itself still runs one request at a time."""

# Ray destroys a non-detached actor once no handle to it is left, even a named one: the process
# that started the pool keeps its handles here until shutdown_workers.
# Keyed by the Ray session too: a handle from an earlier ray.init in this process is dead and
# must not stand in for a new worker of the same name.
_POOL_HANDLES: dict[tuple[str, str, str], Any] = {}


def _session() -> str:
    context = ray.get_runtime_context()
    return f"{context.gcs_address}/{context.get_node_id()}"


@dataclass(frozen=True)
class WorkerPlacement:
    """How one worker runs, as the GPU plan decides it.

    Attributes:
        num_gpus: 1 pins the worker to a whole GPU (Ray sets ``CUDA_VISIBLE_DEVICES``), 0 for CPU.
        num_cpus: logical CPUs the worker reserves. 0 by default: on a 2-CPU machine a worker
            holding a CPU would leave a single one for all trials; the price is that the
            worker's forward passes compete with the trials for the real cores (with a GPU
            backend the worker mostly waits on the GPU, so little is lost).
        input_cap: the backend's initial longest-side cap in pixels, or ``None``.
        resources: extra Ray resources to request (e.g. ``{"gpu_mem_mb": 15000}``).
        options: further ``Actor.options`` (e.g. ``scheduling_strategy``).
    """

    num_gpus: int = 0
    num_cpus: float = 0.0
    input_cap: int | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)


class SegmentationWorkerUnavailableError(RuntimeError):
    """A worker did not answer within the client's retry budget, or does not exist."""


def worker_names(n: int, prefix: str = WORKER_NAME_PREFIX) -> list[str]:
    """The names of a pool of ``n`` workers: ``<prefix>-0`` ... ``<prefix>-<n-1>``."""
    return [f"{prefix}-{i}" for i in range(n)]


def start_workers(
    n: int,
    backend_factory: BackendFactory,
    cache_dir: str | Path | None,
    num_gpus_per_worker: int = 0,
    *,
    placements: Sequence[WorkerPlacement] | None = None,
    memory_cache_bytes: int = DEFAULT_MEMORY_BYTES,
    min_input_cap: int = DEFAULT_MIN_INPUT_CAP,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    detached: bool = False,
    namespace: str = NAMESPACE,
    name_prefix: str = WORKER_NAME_PREFIX,
    ready_timeout_s: float = 600.0,
) -> list[str]:
    """Start (or reuse, by name) ``n`` segmentation workers and wait until their backends loaded.

    Args:
        n: number of workers.
        backend_factory: picklable zero-argument callable building the backend inside each
            worker (e.g. :class:`orchestrator.segmentation_worker.BackendSpec`).
        cache_dir: the disk cache (shared by workers and runs); ``None`` keeps results in memory.
        num_gpus_per_worker: 0 or 1, used when ``placements`` is not given. Workers reserve
            no CPU unless a placement says so (see :class:`WorkerPlacement`).
        placements: one :class:`WorkerPlacement` per worker (from the GPU plan).
        detached: keep the workers after this driver exits (resumable runs). By default they
            live as long as the process that called this (it keeps their handles) or until
            :func:`shutdown_workers`.
        memory_cache_bytes: each worker's memory LRU bound (a 512x512 result is ~1.3 MB).
        min_input_cap: floor of the OOM back-off, in pixels of the longest side.
        max_concurrency: requests inside one worker at once (the model still runs one).
        ready_timeout_s: how long to wait for all backends to load.

    Returns the worker names, for :class:`SegmentationClient` and :func:`shutdown_workers`.
    Existing workers of the same name are reused (``get_if_exists``); if they were started with
    another backend factory this raises :class:`UserError`.
    """
    plan = _placements(n, num_gpus_per_worker, placements)
    cache = None if cache_dir is None else str(Path(cache_dir).expanduser().resolve())
    names = worker_names(n, name_prefix)
    actor_class = ray.remote(SegmentationWorker)
    handles = []
    for name, place in zip(names, plan, strict=True):
        options = dict(
            name=name,
            namespace=namespace,
            get_if_exists=True,
            lifetime="detached" if detached else None,
            max_restarts=-1,
            max_task_retries=-1,
            max_concurrency=max_concurrency,
            num_cpus=place.num_cpus,
            num_gpus=place.num_gpus,
            resources=dict(place.resources) or None,
            **dict(place.options),
        )
        handles.append(
            actor_class.options(**options).remote(
                name,
                backend_factory,
                cache,
                memory_cache_bytes=memory_cache_bytes,
                input_cap=place.input_cap,
                min_input_cap=min_input_cap,
            )
        )
    session = _session()
    for stale in [key for key in _POOL_HANDLES if key[0] != session]:
        del _POOL_HANDLES[stale]
    for name, handle in zip(names, handles, strict=True):
        # Keep the first (owning) handle: dropping it would destroy a reused worker.
        _POOL_HANDLES.setdefault((session, namespace, name), handle)
    _wait_ready(names, handles, describe_factory(backend_factory), ready_timeout_s)
    return names


def shutdown_workers(names: Sequence[str], namespace: str = NAMESPACE) -> None:
    """Kill the named workers for good (no restart); names that no longer exist are skipped."""
    for name in names:
        _POOL_HANDLES.pop((_session(), namespace, name), None)
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            continue
        ray.kill(handle, no_restart=True)


def _placements(
    n: int, num_gpus: int, placements: Sequence[WorkerPlacement] | None
) -> list[WorkerPlacement]:
    if n < 1:
        raise UserError(f"segmentation workers: n={n}; start at least one worker")
    if placements is None:
        if num_gpus not in (0, 1):
            raise UserError(
                f"segmentation workers: num_gpus_per_worker={num_gpus}; use 0 (CPU) or 1 "
                "(one whole GPU per worker: a Sa2VA replica does not share a card well)"
            )
        return [WorkerPlacement(num_gpus=num_gpus) for _ in range(n)]
    if len(placements) != n:
        raise UserError(f"segmentation workers: n={n} but {len(placements)} placements given")
    for i, place in enumerate(placements):
        if place.num_gpus not in (0, 1):
            raise UserError(f"segmentation worker {i}: num_gpus={place.num_gpus}; use 0 or 1")
    return list(placements)


def _wait_ready(names: list[str], handles: list[Any], factory: str, timeout_s: float) -> None:
    refs = [h.factory_description.remote() for h in handles]
    try:
        described = ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise UserError(
            f"segmentation workers {names} did not load their backend within {timeout_s:.0f} s. "
            "Check that the planned resources exist (`ray status`: GPUs, custom resources) and "
            "the worker logs; raise ready_timeout_s for slow model loads."
        ) from None
    for name, found in zip(names, described, strict=True):
        if found != factory:
            raise UserError(
                f"segmentation worker {name!r} already exists with backend {found}, not "
                f"{factory}. Stop it with shutdown_workers([{name!r}]) (or `ray kill`), or "
                "start the new pool under another name_prefix."
            )


class SegmentationClient:
    """A Segmenter backed by the shared worker pool (see the module docstring).

    Picklable: it holds worker names, not handles, and resolves handles lazily in whichever
    process uses it. Returned arrays are read-only (shared with the memo and Ray's object
    store): copy before modifying a mask in place. Errors of one request (e.g.
    :class:`~orchestrator.segmentation_worker.SegmentationOutOfMemoryError`) are raised to its
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
