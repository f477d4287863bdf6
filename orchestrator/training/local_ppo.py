"""RLlib's PPO in this process without Ray: the debug path of ``sa2va-rl train --local``.

RLlib's ``Algorithm`` puts its config into Ray's object store while it builds its env runners,
which starts a Ray instance. :class:`LocalPPO` runs the same PPO from RLlib's own pieces: one
``SingleAgentEnvRunner`` samples ``train_batch_size`` env steps, a local ``LearnerGroup``
(``num_learners=0``) runs the PPO update on them (GAE, clipped surrogate, value loss, KL
coefficient, as RLlib's PPO does), and the new weights go back to the env runner, so each
:meth:`train` is one iteration of ``PPO.training_step``. Results have the shape of
``Algorithm.train()``'s (``env_runners/...``, ``learners/...``, ``num_env_steps_sampled_lifetime``,
``training_iteration``), so :func:`~orchestrator.training.ppo.flatten_result` reads both.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    LEARNER_RESULTS,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
)
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger


class LocalPPO:
    """PPO training iterations of ``config`` (``num_env_runners=0``, ``num_learners=0``) in
    this process; the subset of ``Algorithm`` the training loop uses."""

    def __init__(self, config: PPOConfig) -> None:
        config.validate()
        self.config = config
        self.env_runner = SingleAgentEnvRunner(config=config)
        self.learner_group = config.build_learner_group(env=self.env_runner.env)
        self.metrics = MetricsLogger(root=True)
        self.iteration = 0
        self._sync_weights()

    def train(self) -> dict[str, Any]:
        """One iteration: sample a train batch, update, sync weights; the result dict."""
        episodes: list[Any] = list(
            self.env_runner.sample(num_timesteps=self.config.total_train_batch_size)
        )
        self.metrics.aggregate([self.env_runner.get_metrics()], key=ENV_RUNNER_RESULTS)
        steps = self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME))
        results = self.learner_group.update(
            episodes=episodes,
            timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: steps},
            num_epochs=self.config.num_epochs,
            minibatch_size=self.config.minibatch_size,
            shuffle_batch_per_epoch=self.config.shuffle_batch_per_epoch,
        )
        self.metrics.aggregate(results, key=LEARNER_RESULTS)
        self._sync_weights()
        self.iteration += 1
        result: dict[str, Any] = self.metrics.compile()
        result[NUM_ENV_STEPS_SAMPLED_LIFETIME] = result[ENV_RUNNER_RESULTS][
            NUM_ENV_STEPS_SAMPLED_LIFETIME
        ]
        result["training_iteration"] = self.iteration
        return result

    def get_module(self) -> RLModule:
        """The env runner's (single-agent) module: the policy that samples."""
        module = self.env_runner.module
        assert module is not None, "the env runner builds its module on construction"
        return module

    def stop(self) -> None:
        self.env_runner.stop()
        self.learner_group.shutdown()

    def _sync_weights(self) -> None:
        path = f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}"
        state = self.learner_group.get_state(components=path)[COMPONENT_LEARNER]
        self.env_runner.set_state({COMPONENT_RL_MODULE: state[COMPONENT_RL_MODULE]})
