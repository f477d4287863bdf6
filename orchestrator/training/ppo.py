"""RLlib PPO for the experiments: the algorithm config, episode metrics, and policy export.

The PPO settings are the original experiments' (see ``tune_configs/base.yaml``); every one is
set explicitly because RLlib's defaults differ (lr 5e-5, lambda 1.0, clip 0.3, ...). Sampling
happens in the trial's own process (``num_env_runners=0``) with ``num_envs`` vectorised envs, so
a trial needs exactly the CPU share Tune gives it.

The trained policy is exported as a plain state dict (:func:`export_policy`) that
:class:`ExportedPolicy` loads with ``torch.load(weights_only=True)`` and runs without Ray or
RLlib: evaluation needs no pickled RLlib objects.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

from envs.normalisation import ObservationStats
from models.errors import UserError
from orchestrator import metric_keys as mk
from orchestrator import run_dir
from orchestrator.config import PpoConfig

POLICY_FORMAT_VERSION = 2
"""2: the observation normalisation travels with the weights (``observation_stats``, or the
explicit ``"observation_normalisation": "none"``); 1: raw observations, no stats."""
# Linear layers of RLlib's default actor MLP and logits head (not the critic, not constants).
_POLICY_LAYER = re.compile(r"^(encoder\.actor_encoder|pi)\.net\.mlp\.(\d+)\.(weight|bias)$")


class EpisodeMetrics(RLlibCallback):
    """Logs the last step's ground-truth Dice/Recall, reward-net score and best objective of
    every episode (mean over a 100-episode window) under ``env_runners/<key>``."""

    def on_episode_end(self, *, episode: Any, metrics_logger: Any = None, **kwargs: Any) -> None:
        infos = episode.get_infos()
        last = infos[-1] if infos else {}
        for key, info_key in mk.INFO_KEY_OF.items():
            if info_key in last:
                metrics_logger.log_value(key, float(last[info_key]), reduce="mean", window=100)


def build_ppo_config(ppo: PpoConfig, env_name: str, env_config: dict[str, Any]) -> PPOConfig:
    """The PPO algorithm config for one experiment's registered env."""
    return (
        PPOConfig()
        .environment(env=env_name, env_config=env_config)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=ppo.num_envs)
        .training(
            lr=ppo.lr,
            gamma=ppo.gamma,
            lambda_=ppo.gae_lambda,
            clip_param=ppo.clip_param,
            entropy_coeff=ppo.entropy_coeff,
            vf_loss_coeff=ppo.vf_loss_coeff,
            train_batch_size_per_learner=ppo.train_batch_size,
            minibatch_size=ppo.minibatch_size,
            num_epochs=ppo.num_epochs,
        )
        .rl_module(
            model_config=DefaultModelConfig(fcnet_hiddens=list(ppo.hidden), vf_share_layers=False)
        )
        .learners(num_learners=0)
        .callbacks(EpisodeMetrics)
        .debugging(seed=ppo.seed)
        .reporting(metrics_num_episodes_for_smoothing=100)
    )


def _nested(result: dict[str, Any], path: tuple[str, ...] | str) -> Any:
    value: Any = result
    for part in (path,) if isinstance(path, str) else path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def flatten_result(result: dict[str, Any]) -> dict[str, float]:
    """RLlib's nested training result -> our metric keys (absent values are left out)."""
    runners = result.get("env_runners", {})
    learner = _nested(result, mk.RLLIB_LEARNER) or {}
    flat: dict[str, Any] = {
        mk.EP_REW_MEAN: _nested(result, mk.RLLIB_EPISODE_RETURN),
        mk.EP_LEN_MEAN: _nested(result, mk.RLLIB_EPISODE_LEN),
        mk.ENV_STEPS: result.get(mk.RLLIB_ENV_STEPS),
        mk.ITERATION: result.get("training_iteration"),
        **{key: runners.get(key) for key in mk.EPISODE_CUSTOM_KEYS},
        **{key: learner.get(name) for key, name in mk.RLLIB_LEARNER_KEYS.items()},
    }
    return {k: float(v) for k, v in flat.items() if isinstance(v, int | float) and np.isfinite(v)}


def export_policy(
    module: torch.nn.Module,
    path: Path,
    metadata: dict[str, Any],
    stats: ObservationStats | None = None,
) -> Path:
    """Save the policy network (encoder + head) as a plain state dict with ``metadata`` and the
    observation statistics it was trained behind (``None``: it saw raw observations)."""
    state = {k: v.detach().cpu() for k, v in module.state_dict().items() if _POLICY_LAYER.match(k)}
    payload: dict[str, Any] = {
        "state_dict": state,
        "metadata": {
            "version": POLICY_FORMAT_VERSION,
            **metadata,
            "observation_normalisation": "none" if stats is None else "standardise",
        },
    }
    if stats is not None:
        payload["observation_stats"] = {
            "mean": torch.from_numpy(stats.mean.copy()),
            "std": torch.from_numpy(stats.std.copy()),
            "samples": stats.samples,
        }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    run_dir.write_bytes(path, buffer.getvalue())
    return path


class ExportedPolicy:
    """A policy saved by :func:`export_policy`, runnable with torch alone.

    Rebuilds RLlib's default MLP (tanh hidden layers, linear logits head) from the saved
    weights; :meth:`logits` and :meth:`act` take the env's raw observation and apply the saved
    normalisation first (``stats``; ``None`` for a policy trained on raw observations, which
    includes every version-1 file). :meth:`act` is greedy (argmax), which is what evaluation
    wants.
    """

    def __init__(
        self,
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        metadata: dict[str, Any],
        stats: ObservationStats | None = None,
    ):
        self.layers = layers
        self.metadata = metadata
        self.stats = stats
        if stats is not None and stats.dim != layers[0][0].shape[1]:
            raise UserError(
                f"policy normalisation has {stats.dim} features but its first layer takes "
                f"{layers[0][0].shape[1]}; the file is inconsistent, re-run the experiment"
            )

    @classmethod
    def load(cls, path: str | Path) -> ExportedPolicy:
        path = Path(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            state, metadata = payload["state_dict"], dict(payload["metadata"])
            stats = _stats_of(payload, metadata, path)
        except FileNotFoundError:
            raise UserError(f"policy file {path} not found; re-run the experiment") from None
        except UserError:
            raise
        except pickle.UnpicklingError:
            # torch's own message suggests weights_only=False: wrong advice for untrusted files.
            raise UserError(
                f"policy file {path} holds pickled Python objects, which are never loaded "
                "(they can run code); use a policy exported by sa2va-rl, or re-run the experiment"
            ) from None
        except Exception as err:
            raise UserError(f"policy file {path} is unreadable ({err}); re-run it") from None
        layers = []
        for part in ("encoder.actor_encoder", "pi"):
            indices = sorted(
                {
                    int(m.group(2))
                    for k in state
                    if (m := _POLICY_LAYER.match(k)) and m.group(1) == part
                }
            )
            layers += [
                (state[f"{part}.net.mlp.{i}.weight"], state[f"{part}.net.mlp.{i}.bias"])
                for i in indices
            ]
        if not layers:
            raise UserError(f"policy file {path} holds no policy layers; re-run the experiment")
        return cls(layers, metadata, stats)

    def logits(self, observation: np.ndarray) -> np.ndarray:
        """The action logits of one raw observation (normalised here, as in training)."""
        if self.stats is not None:
            observation = self.stats.apply(observation)
        x = torch.as_tensor(observation, dtype=torch.float32).reshape(1, -1)
        with torch.no_grad():
            for i, (weight, bias) in enumerate(self.layers):
                x = torch.nn.functional.linear(x, weight, bias)
                if i < len(self.layers) - 1:
                    x = torch.tanh(x)
        return x[0].numpy()

    def act(self, observation: np.ndarray) -> int:
        return int(np.argmax(self.logits(observation)))


def _stats_of(
    payload: dict[str, Any], metadata: dict[str, Any], path: Path
) -> ObservationStats | None:
    """The saved normalisation; refuses a file that says it normalised but holds no stats."""
    version = int(metadata.get("version", 1))
    if version > POLICY_FORMAT_VERSION:
        raise UserError(
            f"policy file {path} has format version {version}, newer than this sa2va-rl "
            f"understands ({POLICY_FORMAT_VERSION}); upgrade sa2va-rl or re-run the experiment"
        )
    mode = metadata.get("observation_normalisation", "none" if version == 1 else None)
    if mode == "none":
        return None
    saved = payload.get("observation_stats")
    if mode != "standardise" or saved is None:
        raise UserError(
            f"policy file {path} was trained on normalised observations but holds no "
            "normalisation statistics (observation_stats): evaluating it on raw observations "
            "would not be the policy that was trained; re-run the experiment"
        )
    return ObservationStats(
        saved["mean"].numpy(), saved["std"].numpy(), int(saved.get("samples", 0))
    )
