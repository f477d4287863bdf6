"""Training: the PPO loop, the reward-net trial, the Tune adapter and the Tuner."""
