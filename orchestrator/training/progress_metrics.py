"""Per-experiment progress on the Ray dashboard's metrics (series ``sa2va_experiment_*``).

Each trial sets these gauges after every training iteration, tagged with its ``experiment``
(prompt, postprocess, reward_net, reward_guided), so a user watching the dashboard (or Grafana)
sees env steps and the latest Dice/Recall/reward-net score of every experiment side by side with
the segmentation workers' ``sa2va_segmentation_*`` series.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import ray
from ray.util import metrics

from orchestrator import metric_keys as mk

GAUGES = {
    mk.ENV_STEPS: ("sa2va_experiment_env_steps", "environment steps sampled"),
    mk.EP_REW_MEAN: ("sa2va_experiment_episode_return", "mean episode return (100 episodes)"),
    mk.GT_DICE: ("sa2va_experiment_gt_dice", "mean final ground-truth Dice per episode"),
    mk.GT_RECALL: ("sa2va_experiment_gt_recall", "mean final ground-truth Recall per episode"),
    mk.REWARD_NET_SCORE: ("sa2va_experiment_reward_net_score", "mean final reward-net score"),
    mk.REWARD_NET_VAL_MAE: ("sa2va_experiment_reward_net_val_mae", "reward net validation MAE"),
    mk.EVAL_DICE: ("sa2va_experiment_eval_dice", "test-split Dice of the best policy"),
    mk.EVAL_RECALL: ("sa2va_experiment_eval_recall", "test-split Recall of the best policy"),
}


@lru_cache(maxsize=1)
def _gauges() -> dict[str, Any]:
    return {
        key: metrics.Gauge(name, description, tag_keys=("experiment",))
        for key, (name, description) in GAUGES.items()
    }


def export_progress(experiment: str, results: dict[str, float]) -> None:
    """Set the gauges of ``experiment`` from a result dict keyed by :mod:`metric_keys` names
    (nothing without Ray: ``sa2va-rl train --local`` has no dashboard to feed)."""
    if not ray.is_initialized():
        return
    for key, gauge in _gauges().items():
        if key in results:
            gauge.set(float(results[key]), tags={"experiment": experiment})
