"""Benchmark: what one environment episode costs in-process, with and without the state memo.

Run (from the repository root; about half a minute)::

    python benchmarks/bench_env_step.py
    python benchmarks/bench_env_step.py --episodes 2000 --env postprocess

Builds an experiment's environment with the no-argument defaults (the built-in synthetic frames,
the local Frangi backend behind an in-process memo), segments every (image, prompt) pair first
(as the run's cache warm-up does, so no episode waits for a forward pass), then times seeded
random-action episodes on the fresh env: first visits of a state included, as in a trial. It
then runs the same episodes with the env's state memo turned off
(``envs.segmentation_env.MAX_MEMO_STATES = 0``: every observation and objective computed from the
mask, every state built). Prints milliseconds per episode for both and their ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import envs.defaults as defaults
from envs import segmentation_env
from models.prompts import CANDIDATE_PROMPTS

FACTORIES = {
    "prompt": lambda: defaults.prompt_selection(max_steps=1),
    "postprocess": lambda: defaults.post_process(max_steps=3),
}


def per_episode_ms(env_name: str, episodes: int, seed: int) -> float:
    env = FACTORIES[env_name]()
    rng = np.random.default_rng(seed)
    for sample in env.samples:  # the segmenter's own memo warm for every prompt: as after warm-up
        for prompt in CANDIDATE_PROMPTS:
            env.segmenter.segment(sample.image, prompt)
    env.reset(seed=seed)
    start = time.perf_counter()
    for _ in range(episodes):
        env.reset()
        done = False
        while not done:
            _, _, done, _, _ = env.step(int(rng.integers(env.action_space.n)))
    return (time.perf_counter() - start) / episodes * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--env", choices=sorted(FACTORIES), default="prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    memo = per_episode_ms(args.env, args.episodes, args.seed)
    saved = segmentation_env.MAX_MEMO_STATES
    segmentation_env.MAX_MEMO_STATES = 0
    try:
        plain = per_episode_ms(args.env, args.episodes, args.seed)
    finally:
        segmentation_env.MAX_MEMO_STATES = saved
    print(f"{args.env} env, {args.episodes} random episodes on the built-in frames (Frangi):")
    print(f"  state memo on   {memo:7.2f} ms per episode")
    print(f"  state memo off  {plain:7.2f} ms per episode")
    print(f"  ratio           {plain / memo:7.2f}x")


if __name__ == "__main__":
    main()
