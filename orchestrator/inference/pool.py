"""Starting, finding and stopping the segmentation worker pool (``start_workers``,
``run_workers``, ``shutdown_workers``).

The workers are named Ray actors (``<prefix>-<i>``); :class:`SegmentationClient` finds them by
name in whichever process uses it. A run names its workers under its id (``run_prefix``:
``<run_id>:segmentation-worker-<i>``), so two runs on one cluster never share, report or stop
each other's workers, and its trials find the pool by the run id (``run_workers``), however
many workers the current attempt started.

Failures are bounded: a worker restarts at most :data:`MAX_RESTARTS` times over its life (then
it stays dead and every request to it fails with a clear error), and Ray never re-runs a
request on its own (``max_task_retries=0``): the client retries, and can count how often one
request crashed its worker.

Every worker of a pool works at one input cap, the smallest the plan chose for any of its GPUs
(:func:`pool_input_cap`): the backend id, and so the cache key, holds the cap, and with one cap
per pool an (image, prompt) pair has one answer whichever worker serves it, so results do not
depend on the routing or on how many workers an attempt started.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError

from models.errors import UserError
from orchestrator.inference.backend_spec import BackendFactory, describe_factory
from orchestrator.inference.cache import DEFAULT_MEMORY_BYTES
from orchestrator.inference.gpu_memory import MemoryShare
from orchestrator.inference.transport import NAMESPACE, SegmentationWorkerUnavailableError
from orchestrator.inference.worker import DEFAULT_MIN_INPUT_CAP, SegmentationWorker

WORKER_NAME_PREFIX = "segmentation-worker"
MAX_RESTARTS = 10
"""Restarts of one worker over its life (crashes, a node lost): then it stays dead."""
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
        input_cap: the longest-side cap in pixels this GPU allows, or ``None`` (the pool's
            workers all use the smallest of their placements', :func:`pool_input_cap`).
        resources: extra Ray resources to request (e.g. ``{"gpu_mem_mb": 15000}``).
        options: further ``Actor.options`` (e.g. ``scheduling_strategy``).
        memory_share: the worker's planned share of its GPU (capped and measured), or ``None``.
    """

    num_gpus: int = 0
    num_cpus: float = 0.0
    input_cap: int | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    memory_share: MemoryShare | None = None


def worker_names(n: int, prefix: str = WORKER_NAME_PREFIX) -> list[str]:
    """The names of a pool of ``n`` workers: ``<prefix>-0`` ... ``<prefix>-<n-1>``."""
    return [f"{prefix}-{i}" for i in range(n)]


def run_prefix(run_id: str) -> str:
    """The name prefix of run ``run_id``'s workers."""
    from orchestrator.run_id import scoped

    return scoped(run_id, WORKER_NAME_PREFIX)


def run_workers(run_id: str, namespace: str = NAMESPACE) -> list[str]:
    """The names of run ``run_id``'s live workers, in index order (what the current attempt
    started); :class:`SegmentationWorkerUnavailableError` when it has none."""
    prefix = f"{run_prefix(run_id)}-"
    found = [
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == namespace and entry["name"].startswith(prefix)
    ]
    if not found:
        raise SegmentationWorkerUnavailableError(
            f"run {run_id} has no segmentation workers in Ray namespace {namespace!r} (their "
            "driver ended, or they died after their restarts were used up)"
        )
    return sorted(found, key=lambda name: int(name[len(prefix) :]))


def pool_input_cap(placements: Sequence[WorkerPlacement]) -> int | None:
    """The one input cap of a pool: the smallest planned (``None`` when none is planned)."""
    caps = [place.input_cap for place in placements if place.input_cap is not None]
    return min(caps) if caps else None


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
            worker (e.g. :class:`orchestrator.inference.worker.BackendSpec`).
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
    another backend factory this raises :class:`UserError`. Every worker gets the placements'
    smallest input cap (:func:`pool_input_cap`).
    """
    plan = _placements(n, num_gpus_per_worker, placements)
    cap = pool_input_cap(plan)
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
            max_restarts=MAX_RESTARTS,
            max_task_retries=0,
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
                input_cap=cap,
                min_input_cap=min_input_cap,
                memory_share=place.memory_share,
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
