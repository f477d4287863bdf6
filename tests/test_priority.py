"""Trials off the reward-net chain lower their own CPU priority; the chain keeps its own."""

from __future__ import annotations

import os
import threading

from orchestrator.config import parse_config
from orchestrator.experiments import POSTPROCESS, PROMPT, REWARD_GUIDED, REWARD_NET, Trial
from orchestrator.training.priority import (
    MAX_NICENESS,
    OFF_CHAIN_STEP,
    yield_to_reward_chain,
)


def _in_a_thread(
    trial: Trial, experiments: list[str], *, start: int | None = None, twice: bool = False
) -> tuple[bool, int]:
    """Run it in a fresh thread (Linux niceness is per thread: the test's own stays as it is),
    optionally first at niceness ``start`` (Ray starts its workers at 15)."""
    config = parse_config({"experiments": experiments})
    out: list[tuple[bool, int]] = []

    def body() -> None:
        if start is not None:
            os.setpriority(os.PRIO_PROCESS, 0, start)
        lowered = yield_to_reward_chain(trial, config)
        if twice:
            lowered = yield_to_reward_chain(trial, config)
        out.append((lowered, os.getpriority(os.PRIO_PROCESS, 0)))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return out[0]


def test_trials_off_the_chain_yield_and_the_chain_does_not() -> None:
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    lowered = min(MAX_NICENESS, mine + OFF_CHAIN_STEP)
    everything = ["prompt", "postprocess", "reward"]
    for trial in (PROMPT, POSTPROCESS):
        assert _in_a_thread(trial, everything) == (True, lowered)
    assert _in_a_thread(PROMPT, everything, twice=True) == (True, lowered)  # once per thread
    assert _in_a_thread(PROMPT, everything, start=15) == (True, 19)  # a Ray worker's thread
    for trial in (REWARD_NET, REWARD_GUIDED):
        assert _in_a_thread(trial, everything) == (False, mine)
        assert _in_a_thread(trial, everything, start=15) == (False, 15)
    # Without the reward experiment there is no chain to yield to.
    assert _in_a_thread(PROMPT, ["prompt", "postprocess"]) == (False, mine)
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine
