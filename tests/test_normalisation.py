"""Fixed observation standardisation: exact statistics, the env wrapper, and the exported
policy applying exactly what training applied (or refusing a file that lost its stats)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from envs.defaults import prompt_selection
from envs.normalisation import (
    CLIP,
    NormalisedObservation,
    ObservationStats,
    fit_stats,
    random_policy_observations,
)
from models.errors import UserError
from orchestrator.training.ppo import ExportedPolicy, export_policy


def test_stats_are_mean_and_std_with_constant_features_left_at_zero() -> None:
    obs = np.array([[0.0, 1.0, 5.0], [2.0, 1.0, 5.0], [4.0, 1.0, 5.0]], np.float32)
    stats = ObservationStats.from_observations(obs)
    np.testing.assert_allclose(stats.mean, [2.0, 1.0, 5.0])
    np.testing.assert_allclose(stats.std, [np.sqrt(8 / 3), 1.0, 1.0], rtol=1e-6)
    assert stats.samples == 3
    np.testing.assert_allclose(stats.apply(obs[0]), [-2 / np.sqrt(8 / 3), 0.0, 0.0], rtol=1e-6)
    far = stats.apply(np.array([1e6, 1.0, 5.0]))
    assert far[0] == CLIP
    assert ObservationStats.from_dict(stats.to_dict()).to_dict() == stats.to_dict()
    with pytest.raises(ValueError, match="positive"):
        ObservationStats(np.zeros(2), np.array([1.0, 0.0]))


def test_random_policy_stats_and_wrapper_on_the_prompt_env() -> None:
    env = prompt_selection(max_steps=1, max_images=4)
    obs = random_policy_observations(env, 12, seed=0)
    assert obs.shape == (25, env.observation_space.shape[0])  # 12 steps + 13 resets
    again = random_policy_observations(prompt_selection(max_steps=1, max_images=4), 12, 0)
    np.testing.assert_array_equal(obs, again)
    stats = fit_stats(env, 12, seed=0)
    wrapped = NormalisedObservation(env, stats)
    normalised, _ = wrapped.reset(options={"index": 0})
    raw, _ = env.reset(options={"index": 0})
    np.testing.assert_array_equal(normalised, stats.apply(raw))
    assert wrapped.observation_space.contains(normalised)
    with pytest.raises(ValueError, match="shape"):
        NormalisedObservation(env, ObservationStats(np.zeros(3), np.ones(3)))


class _Module(torch.nn.Module):
    """Parameter names of RLlib's default PPO actor: encoder 4 -> 8, logits head 8 -> 3."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder_w = torch.nn.Linear(4, 8)
        self.pi_w = torch.nn.Linear(8, 3)

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return {
            "encoder.actor_encoder.net.mlp.0.weight": self.encoder_w.weight,
            "encoder.actor_encoder.net.mlp.0.bias": self.encoder_w.bias,
            "pi.net.mlp.0.weight": self.pi_w.weight,
            "pi.net.mlp.0.bias": self.pi_w.bias,
        }

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.pi_w(torch.tanh(self.encoder_w(x)))


def test_exported_policy_applies_the_saved_stats(tmp_path: Path) -> None:
    module = _Module()
    stats = ObservationStats(np.array([0.5, 0.5, 0.1, 0.0]), np.array([0.01, 0.02, 1.0, 3.0]))
    path = export_policy(module, tmp_path / "p.pt", {"trial": "t"}, stats)
    policy = ExportedPolicy.load(path)
    assert policy.metadata["observation_normalisation"] == "standardise"
    raw = np.array([0.51, 0.48, 0.3, 1.5], np.float32)
    with torch.no_grad():
        want = module.logits(torch.from_numpy(stats.apply(raw))).numpy()
    np.testing.assert_allclose(policy.logits(raw), want, rtol=1e-5, atol=1e-6)
    raw_policy = ExportedPolicy.load(export_policy(module, tmp_path / "r.pt", {}))
    assert raw_policy.stats is None
    with torch.no_grad():
        want_raw = module.logits(torch.from_numpy(raw)).numpy()
    np.testing.assert_allclose(raw_policy.logits(raw), want_raw, rtol=1e-5, atol=1e-6)


def _save(path: Path, payload: dict) -> Path:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.write_bytes(buffer.getvalue())
    return path


def test_old_files_load_raw_and_files_missing_their_stats_are_refused(tmp_path: Path) -> None:
    module = _Module()
    state = {k: v.detach() for k, v in module.state_dict().items()}
    v1 = _save(tmp_path / "v1.pt", {"state_dict": state, "metadata": {"version": 1}})
    assert ExportedPolicy.load(v1).stats is None  # version 1 policies were trained raw
    lost = {"version": 2, "observation_normalisation": "standardise"}
    bad = _save(tmp_path / "lost.pt", {"state_dict": state, "metadata": lost})
    with pytest.raises(UserError, match="holds no normalisation statistics"):
        ExportedPolicy.load(bad)
    future = _save(tmp_path / "v9.pt", {"state_dict": state, "metadata": {"version": 9}})
    with pytest.raises(UserError, match="format version 9"):
        ExportedPolicy.load(future)
    wrong = {"mean": torch.zeros(5), "std": torch.ones(5), "samples": 0}
    meta = {"version": 2, "observation_normalisation": "standardise"}
    mismatch = _save(
        tmp_path / "dim.pt", {"state_dict": state, "metadata": meta, "observation_stats": wrong}
    )
    with pytest.raises(UserError, match="5 features but its first layer takes 4"):
        ExportedPolicy.load(mismatch)
