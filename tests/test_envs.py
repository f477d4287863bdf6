"""The three environments: gymnasium API, no ground-truth leak, exact returns, data formats."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.environments import PostProcessEnv, PromptSelectionEnv, RewardGuidedPromptEnv
from envs.sample import Sample
from envs.sources import load_samples
from models.errors import UserError
from models.metrics import dice
from models.prompts import DEFAULT_PROMPT
from models.reward_net import RewardNet, RewardScorer
from models.segmentation import Segmentation

PROMPTS = (DEFAULT_PROMPT, "segment thin vessels", "segment everything dark")
THRESHOLDS = {PROMPTS[0]: 100, PROMPTS[1]: 140, PROMPTS[2]: 200}


class DarknessSegmenter:
    """Deterministic test backend: a prompt-specific threshold on darkness, soft mask included."""

    backend_id = "darkness-v1"

    def __init__(self) -> None:
        self.calls = 0

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        self.calls += 1
        grey = image.mean(axis=2)
        threshold = THRESHOLDS.get(prompt, 100)
        prob = np.clip((threshold + 50 - grey) / 100.0, 0.0, 1.0).astype(np.float32)
        return Segmentation(mask=prob > 0.5, prob=prob)


def _image(seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A grey image with dark lines of three intensities, and the lines as ground truth."""
    rng = np.random.default_rng(seed)
    grey = np.full((size, size), 220, np.uint8)
    gt = np.zeros((size, size), bool)
    for value in (60, 120, 170):
        row = int(rng.integers(4, size - 4))
        grey[row, :] = value
        gt[row, :] = True
    grey = np.clip(grey.astype(int) + rng.integers(-10, 10, grey.shape), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), gt


def _samples(n: int = 4, with_gt: bool = True) -> list[Sample]:
    out = []
    for i in range(n):
        image, gt = _image(i)
        out.append(Sample(f"img{i}.png", f"g{i}", image, gt if with_gt else None))
    return out


def _scorer() -> RewardScorer:
    import torch

    torch.manual_seed(0)
    return RewardScorer(RewardNet(), {"input_size": 32})


def _prompt_env(**kw: object) -> PromptSelectionEnv:
    defaults = {"samples": _samples(), "segmenter": DarknessSegmenter(), "prompts": PROMPTS}
    return PromptSelectionEnv(**{**defaults, **kw})  # type: ignore[arg-type]


def _all_envs(samples: list[Sample] | None = None) -> list[gym.Env]:
    samples = samples or _samples()
    seg = DarknessSegmenter()
    return [
        PromptSelectionEnv(samples=samples, segmenter=seg, prompts=PROMPTS),
        PostProcessEnv(samples=samples, segmenter=seg, base_prompt=PROMPTS[0]),
        RewardGuidedPromptEnv(
            samples=samples, segmenter=seg, prompts=PROMPTS, reward_net=_scorer()
        ),
    ]


def test_check_env_passes_for_all_three() -> None:
    for env in _all_envs():
        check_env(env, skip_render_check=True)


def test_registered_ids_build_with_injected_parts() -> None:
    assert envs.PROMPT_SELECTION in gym.registry
    env = gym.make(
        envs.PROMPT_SELECTION, samples=_samples(), segmenter=DarknessSegmenter(), prompts=PROMPTS
    )
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert info["action"] == "reset"


def test_exact_returns_prompt_selection() -> None:
    samples = _samples(1)
    seg = DarknessSegmenter()
    env = PromptSelectionEnv(samples=samples, segmenter=seg, prompts=PROMPTS, max_steps=3)
    image, gt = samples[0].image, samples[0].mask
    assert gt is not None
    expected = {p: dice(seg.segment(image, p).mask, gt) for p in PROMPTS}
    _, info = env.reset(seed=0)
    assert info["gt_dice"] == expected[PROMPTS[0]]
    total = 0.0
    for action, prompt in [(2, PROMPTS[2]), (1, PROMPTS[1]), (0, PROMPTS[0])]:
        _, reward, terminated, truncated, info = env.step(action)
        total += reward
        assert info["prompt"] == prompt
        assert info["gt_dice"] == expected[prompt]
    assert terminated and not truncated
    # return = final objective - initial objective (here the same prompt: exactly 0).
    assert total == pytest.approx(expected[PROMPTS[0]] - expected[PROMPTS[0]], abs=1e-12)
    assert info["best_reward"] == max(expected.values())


def test_exact_step_rewards_are_dice_changes() -> None:
    env = _prompt_env(samples=_samples(1))
    _, info0 = env.reset(seed=0)
    _, r1, _, _, info1 = env.step(1)
    _, r2, _, _, info2 = env.step(2)
    assert r1 == info1["gt_dice"] - info0["gt_dice"]
    assert r2 == info2["gt_dice"] - info1["gt_dice"]


def test_recall_weight_blends_the_objective() -> None:
    env = _prompt_env(samples=_samples(1), recall_weight=0.25)
    _, info = env.reset(seed=0)
    assert info["objective"] == pytest.approx(0.75 * info["gt_dice"] + 0.25 * info["gt_recall"])


def test_no_ground_truth_leak_into_observations() -> None:
    """Same images, different GT masks: identical observations, different rewards."""
    samples = _samples(3)
    other = [Sample(s.id, s.group, s.image, np.roll(s.mask, 7, axis=0)) for s in samples]  # type: ignore[arg-type]
    pairs = [
        (_prompt_env(samples=samples), _prompt_env(samples=other)),
        (
            PostProcessEnv(samples=samples, segmenter=DarknessSegmenter()),
            PostProcessEnv(samples=other, segmenter=DarknessSegmenter()),
        ),
    ]
    for a, b in pairs:
        obs_a, _ = a.reset(seed=5)
        obs_b, _ = b.reset(seed=5)
        np.testing.assert_array_equal(obs_a, obs_b)
        rewards_a, rewards_b = [], []
        for action in (1, 2, 0):
            obs_a, ra, *_ = a.step(action)
            obs_b, rb, *_ = b.step(action)
            np.testing.assert_array_equal(obs_a, obs_b)
            rewards_a.append(ra)
            rewards_b.append(rb)
        assert rewards_a != rewards_b


def test_postprocess_stop_ends_early_and_threshold_needs_prob() -> None:
    env = PostProcessEnv(samples=_samples(1), segmenter=DarknessSegmenter(), max_steps=3)
    env.reset(seed=0)
    stop = env.action_names.index("stop")
    _, reward, terminated, _, info = env.step(stop)
    assert terminated and reward == 0.0 and info["op"] == "stop"

    class HardOnly(DarknessSegmenter):
        def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
            return Segmentation(mask=super().segment(image, prompt).mask)

    env = PostProcessEnv(samples=_samples(1), segmenter=HardOnly(), max_steps=3)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(env.action_names.index("threshold_down"))
    assert info["op_available"] is False and reward == 0.0 and not terminated


def test_postprocess_threshold_changes_mask_with_prob() -> None:
    env = PostProcessEnv(samples=_samples(1), segmenter=DarknessSegmenter(), max_steps=3)
    obs0, info0 = env.reset(seed=0)
    obs1, _, _, _, info1 = env.step(env.action_names.index("threshold_down"))
    assert info1["op_available"] is True
    assert info1["gt_recall"] >= info0["gt_recall"]
    threshold_dim = env.observation_space.shape[0] - len(env.action_names) - 1
    assert (obs0[threshold_dim], obs1[threshold_dim]) == (np.float32(0.5), np.float32(0.4))


def test_reward_guided_runs_without_ground_truth() -> None:
    env = RewardGuidedPromptEnv(
        samples=_samples(2, with_gt=False),
        segmenter=DarknessSegmenter(),
        prompts=PROMPTS,
        reward_net=_scorer(),
    )
    _, info = env.reset(seed=0)
    assert "gt_dice" not in info and 0.0 <= info["reward_net_score"] <= 1.0
    _, reward, _, _, info2 = env.step(1)
    assert reward == pytest.approx(info2["reward_net_score"] - info["reward_net_score"])
    with pytest.raises(UserError, match="has no ground-truth mask"):
        _prompt_env(samples=_samples(2, with_gt=False))


def test_reset_options_pick_an_image() -> None:
    env = _prompt_env()
    _, info = env.reset(options={"image_id": "img2.png"})
    assert info["image_id"] == "img2.png"
    _, info = env.reset(options={"index": 1})
    assert info["image_id"] == "img1.png"
    with pytest.raises(KeyError):
        env.reset(options={"image_id": "nope.png"})


def test_segmenter_is_asked_once_per_distinct_state() -> None:
    seg = DarknessSegmenter()
    env = _prompt_env(segmenter=seg, max_steps=5)
    env.reset(seed=0, options={"index": 0})
    for action in (0, 1, 2):  # action 0 is the default prompt: the reset's state again
        env.step(action)
    assert seg.calls == 3  # default (reset), prompts 1 and 2; the revisit costs nothing
    env.reset(options={"index": 0})
    env.step(2)
    env.step(1)
    assert seg.calls == 3  # every state of image 0 is known: no request at all
    env.reset(options={"index": 1})
    assert seg.calls == 4  # a new image
    assert env.unwrapped.state.mask.shape == (48, 48)  # the mask is there when read
    assert seg.calls == 4


def test_memoised_observations_and_rewards_equal_fresh_ones() -> None:
    # Mask features and the objective are memoised per (image, origin); every observation and
    # objective must still be what a fresh computation on the state gives, in every env, over
    # many random episodes that revisit states.
    from envs import features

    for env in _all_envs():
        rng = np.random.default_rng(0)
        inner = env.unwrapped
        for episode in range(40):
            obs, info = env.reset(seed=episode)
            done = False
            while True:
                state, sample = inner.state, inner.sample
                fresh = features.mask_features(state.mask, state.prob)
                n_img = features.IMAGE_FEATURE_DIM
                np.testing.assert_array_equal(obs[n_img : n_img + len(fresh)], fresh)
                assert info["objective"] == inner.objective.evaluate(sample, state.mask).value
                assert state.origin is not None and state.origin[0] in PROMPTS
                if done:
                    break
                obs, _, done, _, info = env.step(int(rng.integers(env.action_space.n)))
        # States were revisited: the memo holds fewer entries than states were visited.
        assert 0 < len(inner._memo) < 2 * 40 * (inner.max_steps + 1)


def test_state_origin_records_prompt_and_ops() -> None:
    env = PostProcessEnv(samples=_samples(), segmenter=DarknessSegmenter(), base_prompt=PROMPTS[1])
    env.reset(seed=0)
    assert env.state.origin == (PROMPTS[1],)
    ops = env.ops_config.ops
    env.step(ops.index("dilate"))
    env.step(ops.index("threshold_down"))
    assert env.state.origin == (PROMPTS[1], "dilate", "threshold_down")
    env.step(ops.index("stop"))
    assert env.state.origin == (PROMPTS[1], "dilate", "threshold_down")


# --- built from a data directory in each supported format ---------------------------------------
def _polygon(row: int, width: int) -> list[int]:
    return [0, row, width - 1, row, width - 1, row + 1, 0, row + 1]


def _write_dataset(root: Path, fmt: str) -> None:
    (root / "images").mkdir(parents=True)
    size = 48
    coco: dict = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "vessel"}]}
    entries = []
    for i in range(6):
        grey = np.full((size, size), 220, np.uint8)
        row = 8 + 5 * i
        grey[row : row + 2, :] = 80
        name = f"vid{i // 2}_frame_{i:03d}.png"
        cv2.imwrite(str(root / "images" / name), grey)
        poly = _polygon(row, size)
        entries.append({"image": name, "text": ["blood vessel"], "mask": [poly]})
        coco["images"].append({"id": i, "file_name": name, "height": size, "width": size})
        coco["annotations"].append(
            {"id": i, "image_id": i, "category_id": 1, "segmentation": [poly], "iscrowd": 0}
        )
        if fmt == "folders":
            (root / "masks").mkdir(exist_ok=True)
            mask = np.zeros((size, size), np.uint8)
            mask[row : row + 2, :] = 255
            cv2.imwrite(str(root / "masks" / name), mask)
    if fmt == "sa2va":
        (root / "annotations.json").write_text(json.dumps(entries))
    if fmt == "coco":
        (root / "annotations").mkdir()
        (root / "annotations" / "instances.json").write_text(json.dumps(coco))


@pytest.mark.parametrize("fmt", ["sa2va", "coco", "folders"])
def test_envs_from_each_dataset_format(tmp_path: Path, fmt: str) -> None:
    _write_dataset(tmp_path, fmt)
    seg = DarknessSegmenter()
    built = [
        PromptSelectionEnv(
            samples=load_samples(tmp_path, split="all"), segmenter=seg, prompts=PROMPTS
        ),
        PostProcessEnv(samples=load_samples(tmp_path, split="train"), segmenter=seg),
        RewardGuidedPromptEnv(
            samples=load_samples(tmp_path, split="all", require_masks=False),
            segmenter=seg,
            prompts=PROMPTS,
            reward_net=_scorer(),
        ),
    ]
    for env in built:
        check_env(env, skip_render_check=True)
    assert len(built[0].samples) == 6
    assert {s.group for s in built[1].samples} < {"vid0", "vid1", "vid2"}
