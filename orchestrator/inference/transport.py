"""How a :class:`~orchestrator.inference.client.SegmentationClient` reaches one worker.

A :class:`WorkerTransport` is four calls (``serve``: cached answers, computing the missing ones;
``stats``; ``backend_id``; ``name``) with two implementations:

- :class:`RayTransport`: a named Ray actor (``inference.pool`` starts them), resolved lazily in
  whichever process uses it, picklable (it travels in env configs to Tune trials). The image
  goes to the object store once (``ray.put``) and only its reference travels with the call: a
  worker with every answer cached never fetches it, a cold miss costs one round trip.
- :class:`InProcessTransport`: a :class:`~orchestrator.inference.worker.SegmentationWorker`
  object in this process (``sa2va-rl train --local``, tests): no Ray at all.

A transport that cannot reach its worker raises :class:`WorkerUnavailable` (the worker is
restarting) or :class:`WorkerCrashed` (it died while serving the call); the client retries those
with back-off, counts the crashes of each request, and passes every other error to its caller.
A Ray call that has no answer within ``call_timeout_s`` raises :class:`WorkerTimedOut`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from models.segmentation import Segmentation
from orchestrator.inference.worker import SegmentationWorker

NAMESPACE = "sa2va_rl"
"""The Ray namespace of the worker pool."""
CALL_TIMEOUT_S = 900.0
"""The longest one Ray call may wait for its answer (queued behind other requests, a slow
model): then it fails instead of hanging."""


class WorkerUnavailable(Exception):
    """The transport could not reach its worker (it may be restarting): worth a retry."""


class WorkerCrashed(WorkerUnavailable):
    """The worker died while it served the call (the call itself may have killed it)."""


class WorkerTimedOut(Exception):
    """The worker did not answer the call within the transport's timeout."""


class SegmentationWorkerUnavailableError(RuntimeError):
    """A worker did not answer within the client's retry budget, or does not exist."""


class SegmentationRequestError(RuntimeError):
    """One request failed for good: it crashed its worker again and again, or had no answer
    within the call timeout. The message names the worker, the image and the prompts."""


class WorkerTransport(Protocol):
    """One worker as the client sees it."""

    @property
    def name(self) -> str: ...

    def serve(self, digest: str, image: np.ndarray, prompts: Sequence[str]) -> list[Segmentation]:
        """The segmentations of ``image`` (whose ``image_digest`` is ``digest``) for
        ``prompts``, in order: cached ones by digest, the rest computed, in one call."""
        ...

    def head_inputs(self, digest: str, image: np.ndarray, prompts: Sequence[str]) -> list[Any]:
        """The worker's frozen inputs (:class:`models.heads.FrozenInputs`) of ``image`` for
        ``prompts``, in order (the worker's ``head_inputs``)."""
        ...

    def initial_head(self) -> Any:
        """A fresh :class:`models.heads.MaskHead` of the worker's backend."""
        ...

    def stats(self) -> dict[str, Any]: ...

    def served_pairs(self) -> list[tuple[str, str]]:
        """The (image digest, prompt) pairs the worker has served (see the worker's method)."""
        ...

    def backend_id(self) -> str: ...

    def reset(self) -> None:
        """Forget any resolved connection (the next call resolves the worker afresh)."""
        ...


class InProcessTransport:
    """A worker object in this process. Not picklable: it holds the model itself."""

    def __init__(self, worker: SegmentationWorker) -> None:
        self.worker = worker

    @property
    def name(self) -> str:
        return self.worker.name

    def serve(self, digest: str, image: np.ndarray, prompts: Sequence[str]) -> list[Segmentation]:
        # Same process, same array: the client's digest is the image's, no second hash.
        return self.worker.serve(digest, image_shape(image), prompts, image, trust_digest=True)

    def head_inputs(self, digest: str, image: np.ndarray, prompts: Sequence[str]) -> list[Any]:
        return self.worker.head_inputs(digest, image_shape(image), prompts, image)

    def initial_head(self) -> Any:
        return self.worker.initial_head()

    def stats(self) -> dict[str, Any]:
        return self.worker.stats()

    def served_pairs(self) -> list[tuple[str, str]]:
        return self.worker.served_pairs()

    def backend_id(self) -> str:
        return self.worker.backend_id()

    def reset(self) -> None:
        """Nothing to re-resolve in-process."""

    def __deepcopy__(self, memo: dict[int, Any]) -> InProcessTransport:
        return self  # RLlib copies env configs: every copy must share the one worker

    def __reduce__(self) -> Any:
        raise TypeError(
            f"InProcessTransport({self.name!r}) holds its worker in this process and cannot be "
            "sent to another one; start Ray workers (inference.pool.start_workers) for that"
        )


def image_shape(image: np.ndarray) -> tuple[int, int]:
    return int(image.shape[0]), int(image.shape[1])


class RemoteImage:
    """An image in Ray's object store, fetched by the worker only when it needs the pixels.
    (Wrapped, so Ray does not resolve the reference before the call, as it does for a bare
    top-level argument.)"""

    def __init__(self, refs: list[Any]) -> None:
        self.refs = refs

    def __call__(self) -> np.ndarray:
        import ray

        image: np.ndarray = ray.get(self.refs[0])
        return image


class RayTransport:
    """A named Ray actor, resolved lazily; pickles as its name, namespace and timeout."""

    def __init__(
        self, name: str, namespace: str = NAMESPACE, call_timeout_s: float = CALL_TIMEOUT_S
    ) -> None:
        self._name = name
        self.namespace = namespace
        self.call_timeout_s = call_timeout_s
        self._handle: Any = None

    @property
    def name(self) -> str:
        return self._name

    def __getstate__(self) -> dict[str, Any]:
        return {
            "_name": self._name,
            "namespace": self.namespace,
            "call_timeout_s": self.call_timeout_s,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handle = None

    def __repr__(self) -> str:
        return f"RayTransport({self._name!r}, namespace={self.namespace!r})"

    def serve(self, digest: str, image: np.ndarray, prompts: Sequence[str]) -> list[Segmentation]:
        import ray

        source = RemoteImage([ray.put(image)])
        result: list[Segmentation] = self._call(
            "serve", digest, image_shape(image), list(prompts), source
        )
        return result

    def head_inputs(self, digest: str, image: np.ndarray, prompts: Sequence[str]) -> list[Any]:
        import ray

        source = RemoteImage([ray.put(image)])
        result: list[Any] = self._call(
            "head_inputs", digest, image_shape(image), list(prompts), source
        )
        return result

    def initial_head(self) -> Any:
        return self._call("initial_head")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("stats")
        return result

    def served_pairs(self) -> list[tuple[str, str]]:
        return [(str(d), str(p)) for d, p in self._call("served_pairs")]

    def backend_id(self) -> str:
        return str(self._call("backend_id"))

    def reset(self) -> None:
        self._handle = None

    def _call(self, method: str, *args: Any) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        handle = self._resolve()
        try:
            return ray.get(getattr(handle, method).remote(*args), timeout=self.call_timeout_s)
        except GetTimeoutError:
            raise WorkerTimedOut(f"no answer within {self.call_timeout_s:.0f} s") from None
        except RayActorError as err:  # includes ActorDiedError and ActorUnavailableError
            self._handle = None
            text = f"{type(err).__name__}: {err}"
            # Ray 2.60 says so when the call found the actor restarting (it never reached it).
            if "The actor is restarting" in str(err):
                raise WorkerUnavailable(text) from err
            raise WorkerCrashed(text) from err

    def _resolve(self) -> Any:
        if self._handle is None:
            import ray

            try:
                self._handle = ray.get_actor(self._name, namespace=self.namespace)
            except ValueError:
                raise SegmentationWorkerUnavailableError(
                    f"segmentation worker {self._name!r} does not exist in Ray namespace "
                    f"{self.namespace!r}: it was never started (start_workers), its driver "
                    "ended (non-detached workers die with it), or it died for good after its "
                    "restarts were used up (see its log: `ray list actors`, the dashboard)."
                ) from None
        return self._handle


ImageSource = np.ndarray | Callable[[], np.ndarray]
"""The pixels a worker computes from: the array itself, or a callable fetching it."""
