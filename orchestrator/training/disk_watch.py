"""Driver side of a full disk during Tune, and the Tune experiment state it may tear.

:class:`DiskWatch` is a Tune callback in the driver. It ends the Tune experiment (by raising a
disk-full ``OSError`` from its step hook, which ``tuner.fit`` passes on, like Ctrl-C: trials
not finished stay unfinished for ``--resume``) within one Tune step of either

- a trial failing on a full disk (its ``error.txt`` says ``ENOSPC``), or
- a watched folder's filesystem having less than :data:`FULL_BELOW_BYTES` free (polled every
  :data:`POLL_S` seconds): another process filled the disk, and the trials are about to fail.

No trial then waits for another one's status file that could not be written: they all stop.

Every :data:`BACKUP_S` seconds it also keeps an atomic copy of Tune's experiment state
(``experiment_state-*.json``, ``basic-variant-state-*.json``, ``tuner.pkl``; only copies that
parse) in ``<run>/tune_state_backup/``. :func:`repair_tune_state`, called before
``Tuner.restore`` on ``--resume``, replaces state files a full disk tore with that copy, so
resuming restores every trial instead of silently starting them all again.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator import run_dir
from orchestrator.config import RunConfig
from orchestrator.disk import disk_full_path, free_bytes
from orchestrator.run_dir import TUNE_STATE_BACKUP, RunPaths

FULL_BELOW_BYTES = 8 * 2**20
"""A watched filesystem with less free space than this counts as full."""
POLL_S = 5.0
BACKUP_S = 10.0
STATE_PATTERNS = ("experiment_state-*.json", "basic-variant-state-*.json", "tuner.pkl")


class DiskWatch(tune.Callback):
    """See the module docstring. ``watched``: the run directory and the inference cache."""

    def __init__(self, tune_dir: Path, watched: list[Path]) -> None:
        self.tune_dir = tune_dir
        self.backup_dir = tune_dir.parent / TUNE_STATE_BACKUP
        self.watched = watched
        self.full: str | None = None
        self._polled = self._backed_up = 0.0

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._check_trial(trial)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._check_trial(trial)

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        now = time.monotonic()
        if now - self._polled >= POLL_S:
            self._polled = now
            for folder in self.watched:
                if self.full is None and free_bytes(folder) < FULL_BELOW_BYTES:
                    self.full = str(folder)
        if self.full is not None:
            raise OSError(28, "No space left on device", self.full)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        now = time.monotonic()
        if now - self._backed_up >= BACKUP_S:
            self._backed_up = now
            backup_tune_state(self.tune_dir, self.backup_dir)

    def _check_trial(self, trial: Any) -> None:
        error_file = getattr(trial, "error_file", None)
        if self.full is not None or not error_file:
            return
        try:
            text = Path(error_file).read_text(errors="replace")
        except OSError:
            return
        path = disk_full_path(Exception(text))
        if path is not None:
            # An error that names no file (pyarrow's copy into tune/): name the fullest disk.
            self.full = path or str(min(self.watched, key=free_bytes))


def disk_watched(config: RunConfig, paths: RunPaths) -> list[Path]:
    """The folders a run's :class:`DiskWatch` polls: the run directory and the cache."""
    return [paths.root, Path(config.workers.cache_dir).expanduser()]


def _state_files(folder: Path) -> list[Path]:
    return sorted(p for pattern in STATE_PATTERNS for p in folder.glob(pattern))


def _readable(path: Path) -> bool:
    """Whether a state file is whole: the experiment state parses as JSON (Tune's
    ``basic-variant-state-*.json`` is a pickle despite its name: only checked non-empty)."""
    try:
        data = path.read_bytes()
        if path.name.startswith("experiment_state-"):
            json.loads(data)
        return len(data) > 0
    except (OSError, ValueError):
        return False


def _restorable(files: list[Path]) -> bool:
    """Whether ``files`` are a whole state Tune can restore from (one needs the experiment
    state and ``tuner.pkl``)."""
    names = [p.name for p in files]
    has_state = any(n.startswith("experiment_state-") for n in names)
    return has_state and "tuner.pkl" in names and all(_readable(p) for p in files)


def backup_tune_state(tune_dir: Path, backup_dir: Path) -> None:
    """Copy Tune's state files into ``backup_dir`` (atomically each) when they are a whole,
    restorable set, and drop older copies Tune has replaced; anything less is not copied."""
    files = _state_files(tune_dir)
    if not _restorable(files):
        return
    for path in files:
        run_dir.write_bytes(backup_dir / path.name, path.read_bytes())
    names = {p.name for p in files}
    for old in _state_files(backup_dir):
        if old.name not in names:
            old.unlink(missing_ok=True)


def repair_tune_state(tune_dir: Path) -> str | None:
    """Before ``Tuner.restore``: when a state file in ``tune_dir`` is torn, replace Tune's state
    with the last good copy and say so; returns what was done (``None``: nothing was torn).
    Without a good copy the torn files are moved aside (``*.torn``) and the message says that
    every trial starts over, and why."""
    files = _state_files(tune_dir)
    torn = [p for p in files if not _readable(p)]
    if not torn:
        return None
    backup = tune_dir.parent / TUNE_STATE_BACKUP
    copies = _state_files(backup)
    names = ", ".join(p.name for p in torn)
    for path in files:  # all of them: a set Tune would mix with the copy is not one state
        shutil.move(path, path.with_name(path.name + ".torn"))
    if _restorable(copies):
        for copy in copies:
            run_dir.write_bytes(tune_dir / copy.name, copy.read_bytes())
        return (
            f"Tune's experiment state was torn ({names}, likely by a full disk); restored the "
            f"last good copy from {backup} (at most {BACKUP_S:.0f} s older than the failure): "
            "trials continue from the checkpoints it records"
        )
    return (
        f"Tune's experiment state is torn ({names}, likely by a full disk) and no good copy "
        f"exists in {backup}: every trial starts over (their old directories stay in "
        f"{tune_dir})"
    )
