"""The explicit dependency of experiment 3's step 2 on step 1: ``reward_net/status.json``.

The reward-net trial writes ``RUNNING`` when it starts (every attempt, so a retry after a
failure says RUNNING again), ``READY`` once its checkpoint and reports are written, and
``FAILED`` with the reason when it raises. The reward-guided trial waits for ``READY`` and stops
at once, with that reason, on ``FAILED``: it never waits for a reward net that will not come.
Each write is atomic (:func:`orchestrator.run_dir.write_json`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from models.errors import UserError
from orchestrator.run_dir import RunPaths, write_json

RUNNING, READY, FAILED = "RUNNING", "READY", "FAILED"
POLL_S = 1.0
"""How often the waiting trial reads the status."""
BACKSTOP_S = 6 * 3600
"""Give up if the reward-net trial never even starts (e.g. it waits for GPU memory forever)."""


class RewardNetStatus(NamedTuple):
    state: str
    reason: str = ""


def read_status(paths: RunPaths) -> RewardNetStatus | None:
    """The status the reward-net trial left, or None when it has written none yet. A run from
    before status files whose checkpoint exists counts as READY."""
    path = paths.reward_net_status
    if not path.is_file():
        return RewardNetStatus(READY) if paths.reward_net.is_file() else None
    document = json.loads(path.read_text())
    return RewardNetStatus(str(document["state"]), str(document.get("reason", "")))


def write_status(paths: RunPaths, state: str, reason: str = "") -> None:
    write_json(paths.reward_net_status, {"state": state, "reason": reason, "time": time.time()})


def clear_failed(paths: RunPaths) -> None:
    """Forget a FAILED status before the reward-net trial runs again (``--resume``), so the
    reward-guided trial does not stop on the previous attempt's failure."""
    status = read_status(paths)
    if status is not None and status.state == FAILED:
        paths.reward_net_status.unlink(missing_ok=True)


@contextmanager
def reporting_status(paths: RunPaths) -> Iterator[None]:
    """Around the reward-net trial: RUNNING now, READY when the block finishes, FAILED (with
    the exception as the reason) when it raises."""
    write_status(paths, RUNNING)
    try:
        yield
    except Exception as err:
        write_status(paths, FAILED, f"{type(err).__name__}: {err}")
        raise
    write_status(paths, READY)


def wait_for_reward_net(paths: RunPaths, poll_s: float = POLL_S) -> None:
    """Block until the reward-net trial is READY; raise :class:`UserError` with its reason as
    soon as it is FAILED."""
    deadline = time.monotonic() + BACKSTOP_S
    while True:
        status = read_status(paths)
        if status is not None and status.state == READY:
            return
        if status is not None and status.state == FAILED:
            raise UserError(
                f"the reward-net trial failed ({status.reason}), so the reward-guided trial "
                f"cannot start; see {Path('tune')}/reward_net_*/error.txt in the run directory"
            )
        if time.monotonic() > deadline:
            raise UserError(
                f"the reward-net trial never became READY within {BACKSTOP_S / 3600:.0f} h "
                f"({paths.reward_net_status}: {status.state if status else 'missing'})"
            )
        time.sleep(poll_s)
