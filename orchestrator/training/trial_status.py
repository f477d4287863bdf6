"""Trial B waits for trial A: the run's status board, kept by the driver.

A trial whose registry entry names another in ``Trial.after`` waits (:func:`wait_for`) until
that trial is READY, and stops at once, with the reason, when it is FAILED. Every trial of a
run has a state on the board:

- ``RUNNING``: its process started it (every attempt: a retry says RUNNING again);
- ``READY``: its function returned (its outputs are written);
- ``FAILED``: Tune gave up on it: it raised on its last attempt, or its process died (SIGKILL,
  the out-of-memory killer, a segfault), so no code of its own could say so.

The trial's process reports RUNNING and READY (:func:`reporting`, which also notes the error
it raised); the driver reports what only it can see (``orchestrator.training.tuner.
StatusCallback``: FAILED when Tune marks the trial ERROR, READY for a trial finished in an
earlier attempt of a resumed run). The signal never depends on writing a file: the board is a
small named Ray actor of the run (:func:`start_board`; an object in this process for ``train
--local``, :func:`host_locally`). Each change is also recorded in ``status/<trial>.json`` of
the run directory (:meth:`RunPaths.trial_status`); a record that cannot be written (a full
disk) is logged and otherwise ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from models.errors import UserError
from orchestrator.run_dir import RunPaths, write_json

if TYPE_CHECKING:
    from orchestrator.experiments import TrialSpec

log = logging.getLogger(__name__)

RUNNING, READY, FAILED = "RUNNING", "READY", "FAILED"
POLL_S = 1.0
"""How often a waiting trial reads the board."""
BACKSTOP_S = 6 * 3600
"""Give up if the awaited trial never even finishes (e.g. it waits for GPU memory forever)."""
CALL_TIMEOUT_S = 60.0
"""The longest a call to the board actor may take (it answers from memory)."""
BOARD_NAME = "trial-status"
"""The board actor's name within its run (see :func:`orchestrator.run_id.scoped`)."""


class TrialStatus(NamedTuple):
    state: str
    reason: str = ""


class StatusBoard:
    """The states of one run's trials; each change is also recorded under ``root`` (best
    effort). A Ray actor in a run (:func:`start_board`), a plain object in ``train --local``."""

    def __init__(self, root: str) -> None:
        self.paths = RunPaths(Path(root))
        self.states: dict[str, TrialStatus] = {}
        self.errors: dict[str, str] = {}

    def set(self, trial: str, state: str, reason: str = "") -> None:
        """Set ``trial``'s state (RUNNING forgets its last noted error)."""
        if state == RUNNING:
            self.errors.pop(trial, None)
        self.states[trial] = TrialStatus(state, reason)
        try:
            write_json(
                self.paths.trial_status(trial),
                {"state": state, "reason": reason, "time": time.time()},
            )
        except OSError as err:
            log.warning("could not record %s's status %s: %s", trial, state, err)

    def note_error(self, trial: str, reason: str) -> None:
        """Remember the error ``trial``'s process raised (the reason of a later FAILED)."""
        self.errors[trial] = reason

    def fail(self, trial: str, otherwise: str) -> None:
        """FAILED, with the error ``trial`` noted on its last attempt, else ``otherwise``."""
        self.set(trial, FAILED, self.errors.get(trial, otherwise))

    def get(self, trial: str) -> TrialStatus | None:
        """``trial``'s state, or None when nothing said one yet."""
        return self.states.get(trial)


class Board:
    """A :class:`StatusBoard` as its callers use it, wherever it lives (Ray actor or object)."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def _call(self, method: str, *args: str) -> Any:
        if isinstance(self.target, StatusBoard):
            return getattr(self.target, method)(*args)
        import ray

        return ray.get(getattr(self.target, method).remote(*args), timeout=CALL_TIMEOUT_S)

    def set(self, trial: str, state: str, reason: str = "") -> None:
        self._call("set", trial, state, reason)

    def note_error(self, trial: str, reason: str) -> None:
        self._call("note_error", trial, reason)

    def fail(self, trial: str, otherwise: str) -> None:
        self._call("fail", trial, otherwise)

    def get(self, trial: str) -> TrialStatus | None:
        found = self._call("get", trial)
        return None if found is None else TrialStatus(*found)


_LOCAL_BOARDS: dict[str, StatusBoard] = {}
# Ray destroys a non-detached actor once no handle to it is left, even a named one: the driver
# keeps the board's handle here while the run lasts.
_DRIVER_BOARDS: dict[str, Any] = {}


def host_locally(run_id: str, root: str) -> Board:
    """The board of ``run_id`` as an object in this process (``train --local``: no Ray)."""
    board = _LOCAL_BOARDS.setdefault(run_id, StatusBoard(root))
    return Board(board)


def start_board(run_id: str, root: str) -> None:
    """Start the board of ``run_id`` as a named Ray actor (call on the driver after
    ``ray.init``); it lives as long as this process (or until :func:`stop_board`)."""
    import ray

    from orchestrator.inference.transport import NAMESPACE
    from orchestrator.run_id import scoped

    actor = ray.remote(StatusBoard).options(
        name=scoped(run_id, BOARD_NAME), namespace=NAMESPACE, num_cpus=0, max_restarts=0
    )
    handle: Any = actor.remote(root)
    ray.get(handle.get.remote("-"), timeout=CALL_TIMEOUT_S)  # started, name registered
    _DRIVER_BOARDS[run_id] = handle


def stop_board(run_id: str) -> None:
    """End the board :func:`start_board` started for ``run_id`` (if any)."""
    import ray

    handle = _DRIVER_BOARDS.pop(run_id, None)
    if handle is not None:
        ray.kill(handle, no_restart=True)


def board(run_id: str) -> Board:
    """The board of ``run_id``: the in-process one :func:`host_locally` made, else the run's
    Ray actor (:class:`RuntimeError` naming it when the run has none)."""
    if run_id in _LOCAL_BOARDS:
        return Board(_LOCAL_BOARDS[run_id])
    import ray

    from orchestrator.inference.transport import NAMESPACE
    from orchestrator.run_id import scoped

    name = scoped(run_id, BOARD_NAME)
    try:
        return Board(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        raise RuntimeError(
            f"run {run_id} has no status board (Ray actor {name!r} in namespace {NAMESPACE!r}): "
            "its driver is gone"
        ) from None


@contextmanager
def reporting(spec: TrialSpec) -> Iterator[None]:
    """Around a trial's function: RUNNING now, READY when the block finishes; an exception is
    noted as the reason of the FAILED the driver will report if Tune gives up on the trial."""
    name = spec.trial.name
    status = board(spec.run_id)
    status.set(name, RUNNING)
    try:
        yield
    except Exception as err:
        status.note_error(name, f"{type(err).__name__}: {err}")
        raise
    status.set(name, READY)


def wait_for(spec: TrialSpec, poll_s: float = POLL_S) -> None:
    """Block until the trial ``spec.trial.after`` names is READY (at once when it names none);
    raise :class:`UserError` with its reason as soon as it is FAILED."""
    from orchestrator.experiments import trials_for

    awaited, waiting = spec.trial.after, spec.trial.name
    if awaited is None:
        return
    if awaited not in [t.name for t in trials_for(spec.run)]:
        raise UserError(
            f"the {waiting} trial needs the {awaited} trial, which this run's experiments "
            f"({', '.join(spec.run.experiments)}) do not include"
        )
    status = board(spec.run_id)
    deadline = time.monotonic() + BACKSTOP_S
    while True:
        found = status.get(awaited)
        if found is not None and found.state == READY:
            return
        if found is not None and found.state == FAILED:
            raise UserError(
                f"the {awaited} trial failed ({found.reason}), so the {waiting} trial cannot "
                f"go on; see {Path('tune')}/{awaited}_*/error.txt in the run directory"
            )
        if time.monotonic() > deadline:
            raise UserError(
                f"the {awaited} trial never became READY within {BACKSTOP_S / 3600:.0f} h "
                f"(its state: {found.state if found else 'never started'})"
            )
        time.sleep(poll_s)
