"""The non-RL learners of the evaluation: exact fits on hand-made problems, the op-sequence
table against applying each sequence, and the bandit learning a known contextual task."""

from __future__ import annotations

import numpy as np
import pytest

from envs.defaults import prompt_selection
from envs.mask_ops import MaskOpsConfig, MaskState
from envs.normalisation import ObservationStats, fit_stats
from envs.op_tree import all_sequences, apply_sequence, sequence_states
from models.metrics import mask_metrics
from orchestrator.evaluation.baselines import (
    LinearPicker,
    LinUCB,
    prompt_dice,
    reset_observations,
    sequence_table,
    train_bandit,
)

OPS = MaskOpsConfig(ops=("dilate", "erode", "threshold_down", "stop"))


def test_linear_picker_recovers_a_linear_choice() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)) * [0.01, 1.0, 0.0] + [0.5, 0.0, 1.0]  # tiny, unit, constant
    y = np.c_[x[:, 0] * 100, -x[:, 0] * 100 + 100]  # choice 0 iff x0 > 0.5
    picker = LinearPicker.fit(x, y, ridge=1e-6)
    np.testing.assert_allclose(picker.values(x), y, atol=1e-4)
    assert [picker.pick(row) for row in x] == [int(row[0] < 0.5) for row in x]


def test_linucb_update_matches_the_closed_form() -> None:
    stats = ObservationStats(np.zeros(2), np.ones(2))
    bandit = LinUCB(2, stats, alpha=0.0, ridge=1.0)
    xs = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    rewards = [0.5, -0.2, 0.1]
    for x, r in zip(xs, rewards, strict=True):
        bandit.update(x, 1, r)
    design = np.c_[xs, np.ones(3)]
    theta = np.linalg.solve(design.T @ design + np.eye(3), design.T @ rewards)
    np.testing.assert_allclose(bandit.a_inv[1] @ bandit.b[1], theta, atol=1e-12)
    assert bandit.pulls.tolist() == [0, 3]
    assert bandit.greedy(np.array([1.0, 0.0])) == 1  # arm 0 knows nothing: estimate 0 < 0.5


def test_bandit_on_the_prompt_env_picks_its_best_arm_per_image() -> None:
    env = prompt_selection(max_steps=1, max_images=4)
    samples = env.samples
    stats = fit_stats(env, 64, seed=0)
    bandit = train_bandit(env, 300, stats, seed=0)
    assert bandit.pulls.sum() == 300
    dice = prompt_dice(samples, env.segmenter, env.prompts)
    picks = [bandit.greedy(o) for o in reset_observations(env, samples)]
    chosen = dice[np.arange(len(samples)), picks]
    assert chosen.mean() >= dice[:, 0].mean()  # never worse than the default prompt here
    with pytest.raises(ValueError, match="one decision per image"):
        train_bandit(prompt_selection(max_steps=3, max_images=2), 1, stats, seed=0)


def test_every_sequence_in_order_and_its_state() -> None:
    sequences = all_sequences(OPS, 2)
    assert len(sequences) == 1 + 3 + 9
    assert sequences[:5] == [(), ("dilate",), ("erode",), ("threshold_down",), ("dilate", "dilate")]
    rng = np.random.default_rng(1)
    prob = rng.random((20, 20)).astype(np.float32)
    start = MaskState(prob > 0.5, prob)
    states = sequence_states(start, OPS, 2)
    for seq, state in zip(sequences, states, strict=True):
        want = apply_sequence(start, seq, OPS)
        np.testing.assert_array_equal(state.mask, want.mask, err_msg=str(seq))
        assert state.threshold == want.threshold


def test_sequence_table_and_best_fixed_sequence() -> None:
    env = prompt_selection(max_images=3)
    samples = env.samples
    table = sequence_table(samples, env.segmenter, env.default_prompt, OPS, 2)
    assert table.dice.shape == (3, 13)
    for i, s in enumerate(samples):
        start = MaskState.from_segmentation(env.segmenter.segment(s.image, env.default_prompt))
        for j, seq in enumerate(table.sequences):
            want = mask_metrics(apply_sequence(start, seq, OPS).mask, s.mask).dice  # type: ignore[arg-type]
            assert table.dice[i, j] == pytest.approx(want)
    assert table.best_fixed == table.sequences[int(np.argmax(table.dice.mean(0)))]
