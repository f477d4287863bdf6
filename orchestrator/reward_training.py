"""Reward-network training from a run config: the one recipe the Tune trial and
``sa2va-rl train-reward-net`` share (which masks, how many, which hyper-parameters)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from envs.mask_ops import MaskOpsConfig
from envs.reward_data import build_examples
from envs.sample import Sample
from models.reward_net import RewardExample, RewardNet, RewardNetReport, train_reward_net
from models.segmentation import Segmenter
from orchestrator.config import RunConfig


def examples_for(
    config: RunConfig,
    samples: Iterable[Sample],
    segmenter: Segmenter,
    on_image: Callable[[int], None] | None = None,
) -> list[RewardExample]:
    """Scored masks of ``samples`` (every prompt and post-processing sequences of the config)."""
    cfg = config.reward_net
    return build_examples(
        samples,
        segmenter,
        config.env.prompts,
        per_image=cfg.samples_per_image,
        input_size=cfg.input_size,
        seed=cfg.seed,
        ops=MaskOpsConfig.from_dict(dict(config.mask_ops)),
        on_image=on_image,
    )


def fit(
    config: RunConfig,
    train: list[RewardExample],
    val: list[RewardExample],
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[RewardNet, RewardNetReport]:
    """Train with the config's reward-net hyper-parameters (best epoch by validation MAE)."""
    cfg = config.reward_net
    return train_reward_net(
        train,
        val,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        on_epoch=on_epoch,
    )
