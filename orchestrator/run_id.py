"""A run's id: what makes its Ray actors its own.

Each run directory holds one id (``run_id`` in it, :meth:`RunPaths.run_id`), made when the run
starts and read again by ``--resume``. Every Ray actor a run starts (segmentation workers, the
trial status board) is named under it (:func:`scoped`), so two runs on one cluster never find,
adopt, report or shut down each other's actors, and a resumed run finds its own again.
"""

from __future__ import annotations

import time
import uuid

from orchestrator.run_dir import RunPaths, write_text


def new_run_id() -> str:
    """A fresh id: ``run-<UTC date>-<time>-<6 hex digits>`` (readable in ``ray list actors``)."""
    return f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def ensure_run_id(paths: RunPaths) -> str:
    """The id of the run in ``paths``: the one it holds, or a new one written there now."""
    if paths.run_id.is_file():
        return paths.run_id.read_text().strip()
    run_id = new_run_id()
    write_text(paths.run_id, run_id + "\n")
    return run_id


def scoped(run_id: str, name: str) -> str:
    """The Ray actor name of ``name`` within run ``run_id``: ``<run_id>:<name>`` (no ``/``:
    worker names also name files)."""
    return f"{run_id}:{name}"
