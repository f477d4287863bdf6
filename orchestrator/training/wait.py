"""Waiting for the run's reward net (experiment 3, step 2 needs step 1's checkpoint)."""

from __future__ import annotations

import time
from pathlib import Path

from models.errors import UserError
from orchestrator.experiments import TrialSpec
from orchestrator.run_dir import RunPaths

REWARD_NET_WAIT_S = 6 * 3600


def wait_for_reward_net(spec: TrialSpec) -> None:
    """Block until the reward-net checkpoint of the run exists."""
    path = RunPaths(Path(spec.root)).reward_net
    deadline = time.monotonic() + REWARD_NET_WAIT_S
    while not path.is_file():
        if time.monotonic() > deadline:
            raise UserError(f"the reward network {path} never appeared; did its trial fail?")
        time.sleep(2.0)
