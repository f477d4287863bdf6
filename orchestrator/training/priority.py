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
(:func:`yield_to_reward_chain`, relative to where Ray started them: its workers run at niceness
15, so they go to 19): with idle cores nothing changes; with busy cores the chain gets its core
first and the other trials use what is left.
"""

from __future__ import annotations

import os
import threading

from orchestrator.config import RunConfig
from orchestrator.experiments import Trial, trials_for
from orchestrator.experiments import trial as by_name

OFF_CHAIN_STEP = 10
"""Niceness a trial off the chain adds to its own (Ray starts its workers at niceness 15, so
in a run that is 15 -> 19: CFS weight 15 against the chain's 36)."""
MAX_NICENESS = 19

_thread = threading.local()  # .lowered: this thread's priority was lowered already


def on_reward_chain(trial: Trial) -> bool:
    """Whether ``trial`` is the reward net or waits for it."""
    awaited = None if trial.after is None else by_name(trial.after)
    return trial.trains_reward_net or (awaited is not None and awaited.trains_reward_net)


def lower_thread_priority(step: int = OFF_CHAIN_STEP) -> int:
    """Add ``step`` to the calling thread's niceness (at most :data:`MAX_NICENESS`; Linux nice
    values are per thread, threads started later inherit it), once per thread; returns the
    niceness. Raising one's niceness needs no privilege; nothing here lowers it again."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if not getattr(_thread, "lowered", False):
        _thread.lowered = True
        current = min(MAX_NICENESS, current + step)
        os.setpriority(os.PRIO_PROCESS, 0, current)
    return current


def yield_to_reward_chain(trial: Trial, config: RunConfig) -> bool:
    """Lower the calling thread's priority (:func:`lower_thread_priority`) if ``trial`` is off
    the chain of a run that has one; returns whether it did."""
    chain = [t for t in trials_for(config) if on_reward_chain(t)]
    if not chain or on_reward_chain(trial):
        return False
    lower_thread_priority()
    return True
