"""SegmentationWorker: the Ray actor that owns one segmentation backend and its result cache.

One worker per planned GPU (``num_gpus=1``, so Ray pins the device) or a configured number on a
CPU machine; every trial, experiment and the evaluation share them through
:class:`orchestrator.inference.client.SegmentationClient`, which also starts them
(``start_workers``). This module holds the actor body; it runs without Ray too (the stats are
then not exported), which keeps it testable in-process.

Per request: look the (backend id, image, prompt) key up in the memory LRU, then on disk
(:mod:`orchestrator.inference.cache`); only on a miss take the model lock and run the backend.
The actor is threaded (``max_concurrency`` > 1) so cache hits never wait behind another trial's
forward pass, but the lock lets exactly one model call run at a time (Sa2VA's
``predict_forward`` mutates model state and cannot batch images). A request that waited for the
lock looks again first: when two trials ask the same pair at once, the model runs once. The
missing prompts of one request (one image) go to the backend in one call under one hold of the
lock (``models.segmentation.segment_all``: the backend's ``segment_prompts`` where it has one,
which does the image-only work once), and their disk writes happen after the lock is released
(the entries are held in memory meanwhile, so nobody recomputes them). Each prompt of such a call
counts as one forward pass, with the call's latency shared equally.

CUDA OOM: a ``torch.OutOfMemoryError`` frees the CUDA cache, halves the backend's input cap
(backends expose ``set_input_cap(int)`` or an ``input_cap`` attribute; the longest image side
in pixels) down to ``min_input_cap`` and retries the same request; below the floor the request
fails with :class:`SegmentationOutOfMemoryError`. Both are counted (``oom_retries``,
``oom_failures``). Results computed under an OOM-lowered cap carry the flag
``oom_input_cap=<px>``. The lowered cap stays for the rest of this incarnation. A worker given
its planned share of the GPU is capped at it, so exceeding the plan is such an OOM in this
process and never another's, and reports what it measured against the plan
(:mod:`orchestrator.inference.gpu_memory`).

Any other CUDA error (an illegal memory access, a device-side assert) leaves the CUDA context
unusable, so every later request would fail too: inside Ray the worker logs it, naming the
request, and ends its process (exit code :data:`EXIT_CUDA_FAULT`); Ray restarts it with a
fresh context, and the request's client retries (a bounded number of times). Outside Ray
(``train --local``) the error is raised to the caller.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from models.errors import UserError
from models.segmentation import Segmentation, image_digest, segment_all
from orchestrator.inference.backend_spec import (
    BackendFactory,
    check_image,
    describe_factory,
)
from orchestrator.inference.cache import (
    DEFAULT_MEMORY_BYTES,
    CacheHit,
    CacheKey,
    InferenceCache,
)
from orchestrator.inference.faults import (
    free_cuda_cache,
    is_cuda_fault,
    is_cuda_oom,
    record_incarnation,
)
from orchestrator.inference.gpu_memory import GpuMeter, MemoryShare
from orchestrator.inference.stats import WorkerStats

if TYPE_CHECKING:  # torch: only a worker asked for a head imports it
    from models.heads import FrozenInputs, HeadBackend, MaskHead

log = logging.getLogger(__name__)

DEFAULT_MIN_INPUT_CAP = 256
"""Floor of the OOM back-off, in pixels of the longest side."""
EXIT_CUDA_FAULT = 70
"""Exit code of a Ray worker that ended itself after a CUDA error other than OOM."""


class SegmentationOutOfMemoryError(UserError):
    """A request that ran out of GPU memory even at the smallest input cap."""


class SegmentationWorker:
    """One backend, its cache and its statistics (the body of the Ray actor).

    Args:
        name: the worker's name (``<run id>:segmentation-worker-<i>`` in a run); tags its
            metrics.
        backend_factory: builds the backend, called once here (once per incarnation).
        cache_dir: the disk cache shared by all workers and runs, or ``None`` for memory only.
        memory_cache_bytes: bound of the memory LRU.
        input_cap: initial longest-side cap for the backend (from the GPU plan), or ``None``.
        min_input_cap: floor of the OOM back-off.
        memory_share: the worker's share of its GPU from the plan: the process is capped at it
            and measured against it (:mod:`orchestrator.inference.gpu_memory`), or ``None``.
    """

    def __init__(
        self,
        name: str,
        backend_factory: BackendFactory,
        cache_dir: str | None = None,
        *,
        memory_cache_bytes: int = DEFAULT_MEMORY_BYTES,
        input_cap: int | None = None,
        min_input_cap: int = DEFAULT_MIN_INPUT_CAP,
        memory_share: MemoryShare | None = None,
    ) -> None:
        self.name = name
        self._factory_description = describe_factory(backend_factory)
        restarts, in_ray = record_incarnation(name, cache_dir)
        self._in_ray = in_ray
        self._stats = WorkerStats(name, restarts=restarts, export=in_ray)
        self._memory = GpuMeter(name, memory_share)
        self._memory.cap()
        self._refusal: UserError | None = None
        try:
            self._backend = backend_factory()
        except Exception as err:
            # Raised here, Ray would report an ActorDiedError whose text is a traceback; kept,
            # it reaches start_workers, and the user, as itself (see factory_description).
            self._refusal = self._load_refusal(err)
            log.error("%s: the backend refused to load: %s", name, self._refusal)
            return
        self._memory.record_loaded()
        self._cache = InferenceCache(cache_dir, memory_cache_bytes)
        # Re-entrant: a Frangi head backend reads its soft masks through this worker's serve.
        self._model_lock = threading.RLock()
        self._head_backend: HeadBackend | None = None
        self._min_input_cap = min_input_cap
        if input_cap is not None:
            self._set_cap(input_cap)
        self._initial_cap = self._current_cap()
        # The pool's backend id; a backend whose id includes its cap (Sa2VA) gets another id
        # after an OOM lowered the cap, and its results are stored under that one.
        self._configured_id = self._backend.backend_id
        # (digest, prompt) pairs this incarnation has served: the run summary's distinct pairs.
        self._served: set[tuple[str, str]] = set()
        self._stats.set_input_cap(self._initial_cap)
        log.info("%s: backend %s loaded (restarts: %d)", name, self.backend_id(), restarts)

    def backend_id(self) -> str:
        """The backend's id as configured (before any OOM lowered its input cap)."""
        self._raise_refusal()
        return self._configured_id

    def factory_description(self) -> str:
        """What built the backend (``start_workers`` compares it when it reuses a worker, and
        waits on it: a worker whose backend refused to load, e.g. a device it does not have,
        raises that :class:`UserError` here and serves nothing)."""
        self._raise_refusal()
        return self._factory_description

    def _raise_refusal(self) -> None:
        if self._refusal is not None:
            raise self._refusal

    def _load_refusal(self, err: Exception) -> UserError:
        """What a user is told when loading failed: a refusal as it is, an OOM under the
        planned share as such; anything else is a bug and is raised."""
        if isinstance(err, UserError):
            return err
        share = self._memory.share
        if share is None or not is_cuda_oom(err):
            raise err
        return UserError(
            f"{self.name}: out of GPU memory while loading the backend, capped at its planned "
            f"share of {share.worker_mb} MB (weights {share.weights_mb} MB). Plan what a worker "
            f"really takes with gpu.model_gb, or free the GPU. ({err})"
        )

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        """The segmentation of ``image`` (uint8 HxWx3) for ``prompt``, cached."""
        return self.segment_prompts(image, [prompt])[0]

    def segment_prompts(self, image: np.ndarray, prompts: Sequence[str]) -> list[Segmentation]:
        """The segmentations of one image for several prompts, in order (see :meth:`serve`)."""
        check_image(image)
        hw = (int(image.shape[0]), int(image.shape[1]))
        return self.serve(image_digest(image), hw, prompts, image, trust_digest=True)

    def lookup(
        self, digest: str, hw: tuple[int, int], prompts: Sequence[str]
    ) -> list[Segmentation | None]:
        """Cached results only, by image digest (``image_digest``) and height/width: ``None``
        where nothing is cached. Lets a client skip sending the image when every answer is
        cached; a wrong digest can only miss or return another image's answer to that client,
        never change what is stored."""
        self._stats.request_started()
        try:
            hits = [self._lookup(digest, str(prompt), hw) for prompt in prompts]
            self._stats.count("requests", sum(hit is not None for hit in hits))
            return [None if hit is None else hit.segmentation for hit in hits]
        finally:
            self._stats.request_finished()
            self._stats.sync_counts(self._cache.counters())

    def serve(
        self,
        digest: str,
        hw: tuple[int, int],
        prompts: Sequence[str],
        image: np.ndarray | Callable[[], np.ndarray],
        *,
        trust_digest: bool = False,
    ) -> list[Segmentation]:
        """Every prompt's segmentation of the image with ``digest`` and height/width ``hw``, in
        one call: cached answers by digest, the rest computed from ``image`` (the array, or a
        callable fetching it, called only on a miss). Unless ``trust_digest`` (the caller holds
        the same array), a miss re-hashes the pixels first, so a wrong digest can never store
        an answer under another image's key.

        The prompts not cached are computed in one backend call under one hold of the model
        lock, so a backend that shares work between the prompts of one image (Frangi's filter
        responses, Sa2VA's image encoders) does it once while other requests wait; their disk
        writes happen after the lock is released, overlapping the next request's forward
        passes."""
        self._stats.request_started()
        staged: list[CacheKey] = []
        try:
            wanted = [str(prompt) for prompt in prompts]
            self._stats.count("requests", len(wanted))
            found = {p: self._lookup(digest, p, hw) for p in dict.fromkeys(wanted)}
            results = {p: hit.segmentation for p, hit in found.items() if hit is not None}
            missing = [p for p, hit in found.items() if hit is None]
            if missing:
                pixels = image() if callable(image) else image
                check_image(pixels)
                if not trust_digest and image_digest(pixels) != digest:
                    raise ValueError(f"{self.name}: the image does not match its digest")
                with self._model_lock:
                    results.update(self._compute(pixels, digest, missing, hw, staged))
            # A prompt asked again within the request is a memory hit, counted as one, so that
            # requests == forward passes + hits holds per prompt asked.
            seen: set[str] = set()
            for prompt in wanted:
                if prompt in seen:
                    self._lookup(digest, prompt, hw)
                seen.add(prompt)
            return [results[p] for p in wanted]
        finally:
            for key in staged:
                self._cache.flush(key)
            self._stats.request_finished()
            self._stats.sync_counts(self._cache.counters())

    def head_inputs(
        self,
        digest: str,
        hw: tuple[int, int],
        prompts: Sequence[str],
        image: np.ndarray | Callable[[], np.ndarray],
    ) -> list[FrozenInputs]:
        """The frozen inputs (:mod:`models.heads`) of the image with ``digest`` for each prompt,
        from this worker's model (:func:`models.backends.make_head_backend`; Frangi reads its
        soft masks through this worker's cache), under the model lock. Not cached: a trial
        asks for an image's inputs once. ``UserError`` for a backend without a head."""
        self._raise_refusal()
        pixels = image() if callable(image) else image
        check_image(pixels)
        if image_digest(pixels) != digest or tuple(pixels.shape[:2]) != tuple(hw):
            raise ValueError(f"{self.name}: the image does not match its digest and size")
        with self._model_lock, self._memory.call():
            return self._heads().frozen_inputs(pixels, [str(p) for p in prompts])

    def initial_head(self) -> MaskHead:
        """A fresh head whose soft mask is this worker's backend's (fine-tuning's start)."""
        self._raise_refusal()
        with self._model_lock:
            return self._heads().initial_head()

    def _heads(self) -> HeadBackend:
        if self._head_backend is None:
            from models.backends import make_head_backend

            self._head_backend = make_head_backend(self._backend, base=_CachedPath(self))
        return self._head_backend

    def served_pairs(self) -> list[tuple[str, str]]:
        """The (image digest, prompt) pairs this incarnation has served: a pool's distinct pairs
        are the union over its workers (the warm-up may have one worker compute an image that
        another then serves from the disk cache, so the per-worker counts overlap)."""
        return sorted(self._served)

    def stats(self) -> dict[str, Any]:
        """Counters, queue length, latency percentiles, restarts, cap and cache size."""
        self._stats.sync_counts(self._cache.counters())
        snap = self._stats.snapshot()
        cache = self._cache.counters()
        snap.update(
            backend_id=self.backend_id(),
            distinct_pairs=len(self._served),
            memory_cache_entries=cache["memory_cache_entries"],
            memory_cache_bytes=cache["memory_cache_bytes"],
            pid=os.getpid(),
            gpu_memory=self._memory.report(),
        )
        return snap

    def _compute(
        self,
        image: np.ndarray,
        digest: str,
        prompts: list[str],
        hw: tuple[int, int],
        staged: list[CacheKey],
    ) -> dict[str, Segmentation]:
        """The prompts' answers, under the model lock (the caller holds it): those cached
        meanwhile, the rest from one backend call whose results are staged in the cache (their
        keys added to ``staged``: the caller flushes those to disk once the lock is free)."""
        # Another request may have computed some of them while we waited for the lock.
        found = {p: self._lookup(digest, p, hw) for p in prompts}
        results = {p: hit.segmentation for p, hit in found.items() if hit is not None}
        todo = [p for p, hit in found.items() if hit is None]
        if not todo:
            return results
        try:
            segs = self._run_model(image, todo)
        except Exception:
            # Raised to this request's caller (the worker keeps serving); counted here.
            self._stats.count("model_errors")
            raise
        for prompt, seg in zip(todo, segs, strict=True):
            self._served.add((digest, prompt))
            # Stored under the id of the backend that produced it (its cap may have changed).
            key = CacheKey(self._backend.backend_id, digest, prompt)
            staged.append(key)
            results[prompt] = self._cache.stage(key, seg)
        return results

    def _lookup(self, digest: str, prompt: str, hw: tuple[int, int]) -> CacheHit | None:
        """The configured backend's result first, else one computed after an OOM lowered it."""
        for backend_id in dict.fromkeys((self._configured_id, self._backend.backend_id)):
            hit = self._cache.get(CacheKey(backend_id, digest, prompt), hw)
            if hit is not None:
                self._served.add((digest, prompt))
                return hit
        return None

    def _run_model(self, image: np.ndarray, prompts: list[str]) -> list[Segmentation]:
        attempt = 0
        while True:
            start = time.perf_counter()
            try:
                with self._memory.call():
                    segs = segment_all(self._backend, image, prompts)
            except Exception as err:
                if is_cuda_fault(err) and self._in_ray:
                    self._end_process(image, prompts, err)
                if not is_cuda_oom(err):
                    raise
                message = str(err)
            else:
                share = (time.perf_counter() - start) / len(prompts)
                for _ in prompts:
                    self._stats.forward_pass(share)
                return [self._flag_lowered_cap(seg, image) for seg in segs]
            # Outside the except block the traceback, and the tensors its frames hold, are gone,
            # so emptying the CUDA cache can actually return their memory.
            self._recover_from_oom(image, prompts, message, attempt)
            attempt += 1

    def _end_process(self, image: np.ndarray, prompts: list[str], err: BaseException) -> None:
        """After a CUDA error other than OOM: end this process so that Ray restarts it clean."""
        log.critical(
            "%s: CUDA error on a %dx%d image (digest %s), prompts %r: %s; ending the worker "
            "process so that Ray restarts it with a fresh CUDA context",
            self.name,
            image.shape[1],
            image.shape[0],
            image_digest(image)[:12],
            prompts,
            err,
        )
        logging.shutdown()
        os._exit(EXIT_CUDA_FAULT)

    def _recover_from_oom(
        self, image: np.ndarray, prompts: list[str], message: str, attempt: int
    ) -> None:
        """Free memory and lower the cap for a retry, or raise when nothing is left to lower."""
        free_cuda_cache()
        side = max(image.shape[:2])
        effective = min(self._current_cap() or side, side)
        lowered = effective // 2
        if self._can_set_cap() and lowered >= self._min_input_cap:
            self._stats.count("oom_retries")
            log.warning(
                "%s: CUDA OOM at input cap %d px; retrying at %d px", self.name, effective, lowered
            )
            self._set_cap(lowered)
            return
        if not self._can_set_cap() and attempt == 0:
            self._stats.count("oom_retries")  # no cap to lower: one retry on a freed cache
            log.warning("%s: CUDA OOM; retrying once after freeing the CUDA cache", self.name)
            return
        self._stats.count("oom_failures")
        asked = ", ".join(repr(p) for p in prompts)
        raise SegmentationOutOfMemoryError(
            f"{self.name}: out of GPU memory on a {image.shape[1]}x{image.shape[0]} image for "
            f"prompt(s) {asked} at input cap {effective} px, and the cap cannot go lower (floor "
            f"{self._min_input_cap} px). Free the GPU (other processes, other workers on it), "
            f"plan fewer users of this GPU, or lower min_input_cap. Last error: {message}"
        )

    def _flag_lowered_cap(self, seg: Segmentation, image: np.ndarray) -> Segmentation:
        cap = self._current_cap()
        lowered = cap is not None and (self._initial_cap is None or cap < self._initial_cap)
        if not lowered or cap is None or max(image.shape[:2]) <= cap:
            return seg
        return dataclasses.replace(seg, flags=(*seg.flags, f"oom_input_cap={cap}"))

    def _current_cap(self) -> int | None:
        cap = getattr(self._backend, "input_cap", None)
        return None if cap is None else int(cap)

    def _can_set_cap(self) -> bool:
        return hasattr(self._backend, "set_input_cap") or hasattr(self._backend, "input_cap")

    def _set_cap(self, cap: int) -> None:
        setter = getattr(self._backend, "set_input_cap", None)
        if setter is not None:
            setter(int(cap))
        elif hasattr(self._backend, "input_cap"):
            self._backend.input_cap = int(cap)
        else:
            log.warning("%s: backend has no input cap; ignoring cap %d", self.name, cap)
        self._stats.set_input_cap(self._current_cap())


class _CachedPath:
    """A worker's cached segmentation as a :class:`~models.segmentation.Segmenter` (a Frangi
    head backend reads its soft masks through it, so they come from the cache)."""

    def __init__(self, worker: SegmentationWorker) -> None:
        self._worker = worker

    @property
    def backend_id(self) -> str:
        return self._worker.backend_id()

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        return self._worker.segment(image, prompt)

    def segment_prompts(self, image: np.ndarray, prompts: Sequence[str]) -> list[Segmentation]:
        return self._worker.segment_prompts(image, prompts)
