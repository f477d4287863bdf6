"""A trial's exported policy handed to the trial that trains after it (the registry's
``after``: the combined trial trains on the prompt policy's masks).

A PPO trial that another one comes after copies its best policy atomically to
``handoff/<instance>.pt`` in the run directory when it finishes, before it says READY on the
run's status board (:mod:`orchestrator.training.trial_status`); the waiting trial reads it once
that instance is READY.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.run_dir import RunPaths, write_bytes


def policy_path(paths: RunPaths, instance: str) -> Path:
    """Where the finished trial ``instance`` leaves its best policy for the trial after it."""
    return paths.root / "handoff" / f"{instance}.pt"


def hand_off(paths: RunPaths, instance: str, best_policy: Path) -> Path:
    """Publish ``best_policy`` as :func:`policy_path` (atomically); returns that path."""
    target = policy_path(paths, instance)
    write_bytes(target, best_policy.read_bytes())
    return target
