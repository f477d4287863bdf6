"""Every metric key the project writes: Tune results, TensorBoard tags, stop rules, the report.

TensorBoard tags keep the original experiments' names (``rollout/...``, ``custom/...``) so the
team's dashboards still read them; evaluation reports ``eval/<metric>``.
"""

from __future__ import annotations

# --- per training iteration, written by every PPO trial (TensorBoard + Tune results) ---------
EP_REW_MEAN = "rollout/ep_rew_mean"
EP_LEN_MEAN = "rollout/ep_len_mean"
REWARD_NET_SCORE = "custom/reward_net_score"
GT_DICE = "custom/gt_dice"
GT_RECALL = "custom/gt_recall"
BEST_REWARD = "custom/best_reward"
POLICY_LOSS = "train/policy_loss"
VALUE_LOSS = "train/value_loss"
ENTROPY = "train/entropy"
APPROX_KL = "train/approx_kl"
EXPLAINED_VARIANCE = "train/explained_variance"
ENV_STEPS = "time/total_env_steps"
ITERATION = "time/iterations"

# --- the segmentation workers (inference) -------------------------------------------------------
INFERENCE_FORWARD_PASSES = "inference/forward_passes"
INFERENCE_CACHE_HITS = "inference/cache_hits"
INFERENCE_P95_MS = "inference/p95_latency_ms"

# --- reward-network training trial --------------------------------------------------------------
REWARD_NET_VAL_MAE = "reward_net/val_mae"
REWARD_NET_VAL_SPEARMAN = "reward_net/val_spearman"
REWARD_NET_MEAN_PREDICTOR_MAE = "reward_net/mean_predictor_mae"
REWARD_NET_EPOCH = "reward_net/epoch"

# --- mask-head fine-tuning trials (reward_finetune, supervised_finetune) -----------------------
# They also log REWARD_NET_SCORE and GT_DICE (val images; GT Dice as a reference only).
FINETUNE_STEP = "finetune/step"
FINETUNE_LOSS = "finetune/loss"

# --- evaluation on the test split -----------------------------------------------------------------
EVAL_DICE = "eval/dice"
EVAL_RECALL = "eval/recall"
EVAL_PRECISION = "eval/precision"
EVAL_IOU = "eval/iou"
EVAL_METRICS = {
    "dice": EVAL_DICE,
    "recall": EVAL_RECALL,
    "precision": EVAL_PRECISION,
    "iou": EVAL_IOU,
}

# --- what RLlib's results call the same things ----------------------------------------------------
RLLIB_EPISODE_RETURN = ("env_runners", "episode_return_mean")
RLLIB_EPISODE_LEN = ("env_runners", "episode_len_mean")
RLLIB_ENV_STEPS = "num_env_steps_sampled_lifetime"
RLLIB_LEARNER = ("learners", "default_policy")
RLLIB_LEARNER_KEYS = {
    POLICY_LOSS: "policy_loss",
    VALUE_LOSS: "vf_loss",
    ENTROPY: "entropy",
    APPROX_KL: "mean_kl_loss",
    EXPLAINED_VARIANCE: "vf_explained_var",
}
# Episode-end custom metrics logged by the RLlib callback, under env_runners/<key>.
EPISODE_CUSTOM_KEYS = (GT_DICE, GT_RECALL, REWARD_NET_SCORE, BEST_REWARD)
# info keys the environments put in their last step's info, by the custom metric they feed.
INFO_KEY_OF = {
    GT_DICE: "gt_dice",
    GT_RECALL: "gt_recall",
    REWARD_NET_SCORE: "reward_net_score",
    BEST_REWARD: "best_reward",
}
