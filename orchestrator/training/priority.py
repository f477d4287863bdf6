"""CPU priority between the trials: the reward-net chain first.

Experiment 3 is a chain: its reward-guided PPO trial starts once the reward-net trial is done,
so the run waits for the sum of the two while the other PPO trials run beside them. When the
trials share a few cores (on 2 cores Tune runs all four at once with 0.5 logical CPU each), the
operating system gives the reward-net trial only its fair share of a core next to the prompt and
post-processing trials, and the whole run then waits for the chain at that pace.

Logical CPU shares cannot say "first": they only decide what Tune may start (a larger share for
the reward net would keep the reward-guided trial pending until another trial ends), and Ray
sets ``OMP_NUM_THREADS`` to 1 for any share below 2 CPUs, so torch would not use more threads
either (which also keeps the reward net's training, and so its quality figures, identical to a
run on any machine). So the trials off the chain lower their own scheduling priority instead
(:func:`yield_to_reward_chain`): with idle cores nothing changes; with busy cores the chain gets
its core first and the other trials use what is left.
"""

from __future__ import annotations

import os

from orchestrator.config import RunConfig
from orchestrator.experiments import Trial, trials_for

OFF_CHAIN_NICENESS = 10
"""Niceness of a trial off the chain (CFS weight ~1/10 of a normal process)."""


def on_reward_chain(trial: Trial) -> bool:
    """Whether ``trial`` is the reward net or waits for it."""
    return trial.trains_reward_net or trial.needs_reward_net


def yield_to_reward_chain(trial: Trial, config: RunConfig) -> bool:
    """Lower the calling thread's CPU priority to :data:`OFF_CHAIN_NICENESS` if ``trial`` is off
    the chain of a run that has one (Linux nice values are per thread; threads started later
    inherit it). Idempotent; returns whether the priority is lowered."""
    chain = [t for t in trials_for(config) if on_reward_chain(t)]
    if not chain or on_reward_chain(trial):
        return False
    if os.getpriority(os.PRIO_PROCESS, 0) < OFF_CHAIN_NICENESS:
        os.setpriority(os.PRIO_PROCESS, 0, OFF_CHAIN_NICENESS)
    return True
