"""A trial's exported policy handed to the trial that trains after it (the registry's
``after``: the combined trial trains on the prompt policy's masks).

When a trial that another one waits for finishes, its best policy is copied atomically to
``handoff/<instance>.pt`` in the run directory; if it raises, ``handoff/<instance>.failed``
holds the reason (a retry clears it). The waiting trial polls for one or the other: it starts
once the policy is there and stops at once, with that reason, on a failure.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models.errors import UserError
from orchestrator.run_dir import RunPaths, write_bytes, write_text

POLL_S = 1.0
BACKSTOP_S = 6 * 3600
"""Give up if the trial waited for never even finishes (e.g. it waits for resources forever)."""


def policy_path(paths: RunPaths, instance: str) -> Path:
    """Where the finished trial ``instance`` leaves its best policy for the trial after it."""
    return paths.root / "handoff" / f"{instance}.pt"


def _failure_path(paths: RunPaths, instance: str) -> Path:
    return paths.root / "handoff" / f"{instance}.failed"


@contextmanager
def handing_off(paths: RunPaths, instance: str, best_policy: Path) -> Iterator[None]:
    """Around a trial that another one waits for: on success, publish ``best_policy`` as
    :func:`policy_path`; on an exception, record it as the failure (and re-raise)."""
    _failure_path(paths, instance).unlink(missing_ok=True)
    try:
        yield
    except Exception as err:
        write_text(_failure_path(paths, instance), f"{type(err).__name__}: {err}")
        raise
    write_bytes(policy_path(paths, instance), best_policy.read_bytes())


def wait_for_policy(paths: RunPaths, instance: str, poll_s: float = POLL_S) -> Path:
    """The policy trial ``instance`` handed off, once it is there; :class:`UserError` with the
    reason as soon as that trial failed (or after :data:`BACKSTOP_S`)."""
    deadline = time.monotonic() + BACKSTOP_S
    path, failure = policy_path(paths, instance), _failure_path(paths, instance)
    while not path.is_file():
        if failure.is_file():
            raise UserError(
                f"trial {instance!r} failed ({failure.read_text()}), so the trial trained on its "
                f"policy cannot start; see tune/{instance}_*/error.txt in the run directory"
            )
        if time.monotonic() > deadline:
            raise UserError(f"trial {instance!r} did not finish within {BACKSTOP_S / 3600:.0f} h")
        time.sleep(poll_s)
    return path
