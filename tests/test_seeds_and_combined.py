"""Seeds (one trial instance per training seed, aggregated per method) and the combined trial
(post-processing trained on the prompt policy's masks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from envs.sources import DataRef
from envs.synthetic import generate_samples
from models.errors import UserError
from orchestrator import experiments as registry
from orchestrator.config import CONFIG_DIR, load_config
from orchestrator.evaluation.methods import make_evaluator
from orchestrator.evaluation.stage import policy_steps
from orchestrator.evaluation.statistics import summarise
from orchestrator.experiments import (
    COMBINED,
    POSTPROCESS,
    PROMPT,
    TrialSpec,
    build_env,
    instance_names,
    parse_instance,
    prompts_after,
    trial,
    trials_for,
    trials_of_experiment,
)
from orchestrator.run_dir import RunPaths
from orchestrator.training.handoff import hand_off
from orchestrator.training.ppo import ExportedPolicy, export_policy
from orchestrator.training.trial_status import FAILED, READY, host_locally
from tests.fakes import FakeSegmenter

SMOKE = load_config(CONFIG_DIR / "smoke.yaml")
TWO_SEEDS = SMOKE.model_copy(update={"ppo": SMOKE.ppo.model_copy(update={"seeds": 2})})


def _spec(trial_name: str, root: Path, config=SMOKE) -> TrialSpec:  # type: ignore[no-untyped-def]
    spec, seed = parse_instance(trial_name)
    return TrialSpec(spec, config, str(root), root.name, "fake", DataRef("/d", None, ""), seed=seed)


def test_every_ppo_trial_runs_once_per_seed_with_its_own_ppo_seed(tmp_path: Path) -> None:
    # One seed: every trial once, in the registry's order (test_run_dir pins the registry).
    assert instance_names(SMOKE) == [t.name for t in registry.TRIALS]
    assert instance_names(TWO_SEEDS) == [
        "prompt",
        "prompt_seed1",
        "postprocess",
        "postprocess_seed1",
        "reward_net",  # trained once: it serves every seed's reward-guided trial
        "reward_guided",
        "reward_guided_seed1",
        "combined",
        "combined_seed1",
        "reward_finetune",  # a fine-tuned head is seeded too (finetune.seed + k)
        "reward_finetune_seed1",
        "supervised_finetune",
        "supervised_finetune_seed1",
    ]
    second = TrialSpec.from_param(_spec("prompt_seed1", tmp_path, TWO_SEEDS).to_param())
    assert (second.trial, second.seed, second.name) == (PROMPT, 1, "prompt_seed1")
    assert second.ppo.seed == TWO_SEEDS.ppo.seed + 1 and second.run == TWO_SEEDS
    assert trial("combined_seed1") is COMBINED
    # A seeded trial waits for the instance of its seed; the reward net serves every seed.
    assert _spec("combined_seed1", tmp_path, TWO_SEEDS).awaits == "prompt_seed1"
    assert _spec("reward_guided_seed1", tmp_path, TWO_SEEDS).awaits == "reward_net"
    assert _spec("reward_finetune_seed1", tmp_path, TWO_SEEDS).awaits == "reward_net"
    assert _spec("prompt_seed1", tmp_path, TWO_SEEDS).awaits is None
    with pytest.raises(KeyError, match="unknown trial 'prompt_seedx'"):
        trial("prompt_seedx")


def test_combined_runs_only_with_the_prompt_experiment() -> None:
    only_post = SMOKE.model_copy(update={"experiments": ("postprocess",)})
    assert trials_for(only_post) == [POSTPROCESS]
    assert trials_of_experiment("postprocess") == [POSTPROCESS]  # `train --local` runs alone


class _ConstantPolicy(torch.nn.Module):
    """RLlib's actor parameter names; the logits ignore the observation and pick ``action``."""

    def __init__(self, obs_dim: int, n_actions: int, action: int) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(obs_dim, 4)
        self.pi = torch.nn.Linear(4, n_actions)
        with torch.no_grad():
            self.pi.weight.zero_()
            self.pi.bias.copy_(torch.eye(n_actions)[action])

    def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        return {
            "encoder.actor_encoder.net.mlp.0.weight": self.encoder.weight,
            "encoder.actor_encoder.net.mlp.0.bias": self.encoder.bias,
            "pi.net.mlp.0.weight": self.pi.weight,
            "pi.net.mlp.0.bias": self.pi.bias,
        }


def _hand_off_prompt_policy(paths: RunPaths, instance: str, env_obs_dim: int, action: int) -> None:
    """What the prompt trial ``instance`` does when it finishes: hand off, then say READY."""
    module = _ConstantPolicy(env_obs_dim, len(SMOKE.env.prompts), action)
    hand_off(paths, instance, export_policy(module, paths.root / "best.pt", {"trial": instance}))
    host_locally(paths.root.name, str(paths.root)).set(instance, READY)


def test_combined_trains_on_the_prompt_policys_masks(tmp_path: Path) -> None:
    samples = generate_samples(2)
    segmenter = FakeSegmenter()
    prompt_env = build_env(PROMPT, SMOKE, samples, segmenter)
    chosen = SMOKE.env.prompts.index(SMOKE.env.default_prompt) + 1
    # The prompt trial of seed 1 hands its policy off (it always ends on prompt `chosen`).
    _hand_off_prompt_policy(
        RunPaths(tmp_path), "prompt_seed1", prompt_env.observation_space.shape[0], chosen
    )
    combined = _spec("combined_seed1", tmp_path)
    base_prompts = prompts_after(combined, segmenter, samples)
    assert base_prompts == {s.id: SMOKE.env.prompts[chosen] for s in samples}
    env = build_env(COMBINED, SMOKE, samples, segmenter, base_prompts=base_prompts)
    for sample in samples:
        env.reset(options={"image_id": sample.id})
        want = segmenter.segment(sample.image, SMOKE.env.prompts[chosen]).mask
        default = segmenter.segment(sample.image, SMOKE.env.default_prompt).mask
        assert np.array_equal(env.state.mask, want) and not np.array_equal(want, default)
    # The combined trial of seed 0 waits for prompt (seed 0), which failed here.
    host_locally(tmp_path.name, str(tmp_path)).set("prompt", FAILED, "RuntimeError: no policy")
    with pytest.raises(UserError, match=r"the prompt trial failed \(RuntimeError: no policy\)"):
        prompts_after(_spec("combined", tmp_path), segmenter, samples)


def test_seeds_are_evaluated_separately_and_aggregated(tmp_path: Path) -> None:
    samples = generate_samples(4, frames_per_video=2)
    segmenter = FakeSegmenter()
    obs_dim = build_env(PROMPT, SMOKE, samples, segmenter).observation_space.shape[0]
    default = SMOKE.env.prompts.index(SMOKE.env.default_prompt)
    policies = {}
    for name, action in (("prompt", default), ("prompt_seed1", default + 1)):
        module = _ConstantPolicy(obs_dim, len(SMOKE.env.prompts), action)
        policies[name] = ExportedPolicy.load(export_policy(module, tmp_path / f"{name}.pt", {})).act
    evaluator = make_evaluator(SMOKE, samples, segmenter)
    envs = {name: build_env(trial(name), SMOKE, samples, segmenter) for name in policies}
    rl = [row for _, compute in policy_steps(policies, envs, evaluator) for row in compute()]
    rows = [*evaluator.baseline(), *rl]
    assert sorted({r.seed for r in rl}) == [0, 1] and len(rl) == 2 * len(samples)
    assert {r.detail for r in rl if r.seed == 1} == {SMOKE.env.prompts[default + 1]}
    groups = {s.id: s.group for s in samples}
    summary = summarise(rows, groups=groups)["prompt_rl"]
    per_seed = {k: np.mean([r.dice for r in rl if r.seed == k]) for k in (0, 1)}
    assert summary.per_seed is not None and summary.seeds == 2 and summary.videos == 2
    assert summary.per_seed[0]["dice"] == pytest.approx(per_seed[0])
    assert summary.per_seed[1]["dice"] == pytest.approx(per_seed[1])
    assert per_seed[0] != per_seed[1]
    assert summary.metrics["dice"].mean == pytest.approx((per_seed[0] + per_seed[1]) / 2)
