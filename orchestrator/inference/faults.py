"""What a segmentation worker's process knows about its own failures: which exceptions are a
CUDA out-of-memory (the worker lowers its input cap and retries), which are another CUDA error
(the worker ends its process so Ray restarts it clean: a CUDA context after such an error is
unusable), and how many times this actor has been restarted (counted across restarts in a file
keyed by the actor id).

Nothing here imports torch or Ray: a process that never imported them cannot have raised their
errors or be an actor.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path

from orchestrator import run_dir

log = logging.getLogger(__name__)


def is_cuda_oom(err: BaseException) -> bool:
    # torch is only in sys.modules if the backend imported it; a backend that never imported
    # torch cannot raise its OOM, and the worker need not pay torch's import time.
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, oom_type)


def is_cuda_fault(err: BaseException) -> bool:
    """A CUDA error that is not an OOM (``torch.AcceleratorError``, or a RuntimeError that
    says "CUDA error" on builds without that type)."""
    torch = sys.modules.get("torch")
    if torch is None or is_cuda_oom(err):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(err, accelerator_error):
        return True
    return isinstance(err, RuntimeError) and "CUDA error" in str(err)


def free_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def record_incarnation(name: str, cache_dir: str | None) -> tuple[int, bool]:
    """Count this start of the actor; returns (restarts before this one, running inside Ray).

    The count lives in a file keyed by the actor id, which stays the same across restarts: under
    ``<cache_dir>/.workers/`` (shared storage also covers a restart on another node), else in the
    temp dir. Ray's ``was_current_actor_reconstructed`` guarantees at least 1 after a restart.
    """
    ray = sys.modules.get("ray")  # an actor's process has imported Ray; without it, no Ray
    if ray is None or not ray.is_initialized():
        return 0, False
    context = ray.get_runtime_context()
    actor_id = context.get_actor_id()
    if actor_id is None:
        return 0, False
    state_dir = Path(cache_dir) / ".workers" if cache_dir else Path(tempfile.gettempdir())
    path = state_dir / f"sa2va_rl-{name}-{actor_id}.incarnations"
    try:
        previous = int(path.read_text()) if path.exists() else 0
    except (OSError, ValueError):
        previous = 0
    try:
        run_dir.write_text(path, str(previous + 1))
    except OSError as err:
        log.warning("%s: cannot record the restart count in %s: %s", name, path, err)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Ray 2.60 warns from inside
        reconstructed = bool(context.was_current_actor_reconstructed)
    return (max(previous, 1) if reconstructed else previous), True
