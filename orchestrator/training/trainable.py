"""The Tune trainable: the thin adapter between Tune and the trial functions.

Its ``config`` is a :class:`~orchestrator.experiments.TrialSpec` in plain-data form (Tune stores
it in ``params.json``). Environments reach the models only through a
:class:`~orchestrator.inference.client.SegmentationClient` over the run's Ray workers, found by
the run id when the trial starts. PPO trials
(:func:`~orchestrator.training.loop.train_ppo`) report every iteration with a checkpoint (RLlib
state for resuming plus ``best_policy.pt``) and resume from Tune's checkpoint after a failure or
``--resume``; the reward-net trial reports one result per epoch; the mask-head fine-tuning
trials (:mod:`~orchestrator.training.finetune`) one per evaluation. Every trial says RUNNING and
READY on its run's status board (:func:`~orchestrator.training.trial_status.reporting`); a PPO
trial another one trains after (the registry's ``after``) hands its best policy off first
(:mod:`orchestrator.training.handoff`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator.experiments import TrialSpec, hands_off
from orchestrator.inference.client import SegmentationClient
from orchestrator.run_dir import BEST_POLICY_FILE
from orchestrator.training.finetune import run_finetune
from orchestrator.training.handoff import hand_off
from orchestrator.training.loop import train_ppo
from orchestrator.training.priority import yield_to_reward_chain
from orchestrator.training.reward_net import train_run_reward_net
from orchestrator.training.trial_status import reporting


class TuneSink:
    """:class:`~orchestrator.training.loop.ResultSink` over ``tune.report``/checkpoints."""

    keeps_checkpoints = True

    def __init__(self) -> None:
        self.trial_dir = Path(tune.get_context().get_trial_dir())

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: Mapping[str, float], checkpoint: Path | None = None) -> None:
        saved = None if checkpoint is None else tune.Checkpoint.from_directory(str(checkpoint))
        tune.report(dict(metrics), checkpoint=saved)


def run_trial(param: dict[str, Any]) -> None:
    """Tune entry point: the trial of ``param`` (a :meth:`TrialSpec.to_param`)."""
    spec = TrialSpec.from_param(param)
    client = SegmentationClient.for_run(spec.run_id)
    with reporting(spec):
        if spec.trial.trains_reward_net:
            train_run_reward_net(spec, client, TuneSink())
            return
        yield_to_reward_chain(spec.trial, spec.run)
        if spec.trial.head_objective:
            run_finetune(spec, client, TuneSink())
            return
        sink = TuneSink()
        train_ppo(spec, client, sink)
        if hands_off(spec.trial):
            hand_off(spec.paths, spec.name, sink.trial_dir / BEST_POLICY_FILE)
