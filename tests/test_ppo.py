"""PPO wiring: the original hyper-parameters reach RLlib, results map to our keys, and the
exported policy computes exactly what RLlib's module computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from orchestrator import metric_keys as mk
from orchestrator.config import CONFIG_DIR, load_config
from orchestrator.training.ppo import (
    ExportedPolicy,
    build_ppo_config,
    export_policy,
    flatten_result,
)


def test_original_hyperparameters_are_set_explicitly() -> None:
    ppo = load_config(CONFIG_DIR / "quick.yaml").ppo
    cfg = build_ppo_config(ppo, "CartPole-v1", {})
    assert (cfg.lr, cfg.gamma, cfg.lambda_, cfg.clip_param) == (3e-4, 0.99, 0.95, 0.2)
    assert (cfg.entropy_coeff, cfg.vf_loss_coeff, cfg.minibatch_size) == (0.01, 0.5, 64)
    assert (cfg.num_env_runners, cfg.num_envs_per_env_runner, cfg.num_learners) == (0, 2, 0)
    assert cfg.train_batch_size_per_learner == 256
    model = cfg.model_config
    assert (model["fcnet_hiddens"], model["vf_share_layers"]) == ([128, 64], False)


def test_flatten_result_maps_rllib_keys() -> None:
    result = {
        "env_runners": {
            "episode_return_mean": 0.25,
            "episode_len_mean": 2.5,
            mk.GT_DICE: 0.7,
            mk.BEST_REWARD: float("nan"),
        },
        "learners": {"default_policy": {"policy_loss": -0.1, "vf_loss": 0.3, "entropy": 2.2}},
        "num_env_steps_sampled_lifetime": 512,
        "training_iteration": 2,
    }
    assert flatten_result(result) == {
        mk.EP_REW_MEAN: 0.25,
        mk.EP_LEN_MEAN: 2.5,
        mk.GT_DICE: 0.7,
        mk.POLICY_LOSS: -0.1,
        mk.VALUE_LOSS: 0.3,
        mk.ENTROPY: 2.2,
        mk.ENV_STEPS: 512.0,
        mk.ITERATION: 2.0,
    }


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_exported_policy_matches_rllib_module(local_ray: None, tmp_path: Path) -> None:
    ppo = load_config(CONFIG_DIR / "smoke.yaml").ppo
    algo = build_ppo_config(ppo, "CartPole-v1", {}).build_algo()
    try:
        module = algo.get_module()
        path = export_policy(module, tmp_path / "policy.pt", {"trial": "test"})
        policy = ExportedPolicy.load(path)
        obs = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
        with torch.no_grad():
            expected = module.forward_inference({"obs": torch.from_numpy(obs)})
        logits = expected["action_dist_inputs"].numpy()
        for row, want in zip(obs, logits, strict=True):
            np.testing.assert_allclose(policy.logits(row), want, rtol=1e-5, atol=1e-6)
            assert policy.act(row) == int(np.argmax(want))
        assert policy.metadata["trial"] == "test"
        # Plain tensors only: loads with weights_only=True (no pickled code).
        torch.load(path, weights_only=True)
    finally:
        algo.stop()
