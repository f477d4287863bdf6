"""The non-RL learners of the evaluation: exact fits on hand-made problems, the op-sequence
table against applying each sequence, and the bandit learning a known contextual task."""

from __future__ import annotations

import numpy as np
import pytest

from envs.defaults import prompt_selection
from envs.mask_ops import MaskOpsConfig, MaskState
from envs.normalisation import ObservationStats
from envs.op_tree import all_sequences, apply_sequence, sequence_states
from models.metrics import mask_metrics
from orchestrator.evaluation.baselines import (
    LinearPicker,
    LinUCB,
    PromptOutcomes,
    prompt_outcomes,
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


def test_prompt_outcomes_are_the_envs_rewards() -> None:
    env = prompt_selection(max_steps=1, max_images=4)
    outcomes = prompt_outcomes(env, env.samples)
    assert outcomes.observations.shape == (4, env.observation_space.shape[0])
    assert outcomes.default_index == 0
    for i, s in enumerate(env.samples):
        for action in range(len(env.prompts)):
            obs, _ = env.reset(options={"image_id": s.id})
            np.testing.assert_array_equal(obs, outcomes.observations[i])
            _, reward, terminated, _, info = env.step(action)
            assert terminated and reward == pytest.approx(outcomes.rewards[i, action])
            assert info["gt_dice"] == pytest.approx(outcomes.dice[i, action])
    with pytest.raises(ValueError, match="one decision per image"):
        prompt_outcomes(prompt_selection(max_steps=3, max_images=2), env.samples)


def test_bandit_learns_a_context_dependent_arm() -> None:
    # Two contexts; arm 1 pays on the first, arm 2 on the second, arm 0 (default) nothing.
    rewards = np.array([[0.0, 0.05, -0.05], [0.0, -0.05, 0.05]])
    observations = np.array([[0.50, 0.1], [0.51, 0.1]])  # the contexts differ by 0.01 only
    outcomes = PromptOutcomes(observations, rewards, rewards + 0.7, default_index=0)
    bandit = train_bandit(outcomes, 200, seed=0)
    assert bandit.pulls.sum() == 200
    assert [bandit.greedy(o) for o in observations] == [1, 2]
    assert bandit.pulls[1] > bandit.pulls[0] and bandit.pulls[2] > bandit.pulls[0]


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
