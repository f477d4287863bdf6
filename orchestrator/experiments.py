"""The one registry of experiments and trials, and the typed spec a trial runs from.

Four experiments, seven trials (experiment 3 has two steps; ``combined`` is experiment 2
trained on experiment 1's masks; ``finetune`` uses experiment 3's step 1):

===================  =================  ===============================================
trial                experiment         what it does
===================  =================  ===============================================
prompt               1 prompt           PPO over PromptSelection-v0 (reward: change of
                                        GT Dice)
postprocess          2 post-processing  PPO over PostProcess-v0 (reward: change of GT Dice)
reward_net           3 step 1           supervised training of the reward network
reward_guided        3 step 2           PPO over RewardGuidedPrompt-v0 (reward: change of
                                        the reward network's score), once step 1 is READY
combined             2 post-processing  PPO over PostProcess-v0 starting from the mask of
                                        the prompt the prompt policy chooses per image;
                                        once the prompt trial of its seed is done
reward_finetune      finetune           the backend's mask head fine-tuned to please the
                                        reward net, no labels, once step 1 is READY
supervised_finetune  finetune           the same head trained with the labels (reference)
===================  =================  ===============================================

A trial that depends on another names it in ``after``: it waits for that trial's READY and
stops, with the reason, when it FAILED (:mod:`orchestrator.training.trial_status`); choosing
it brings that trial into the run (:func:`trials_for`).

Seeds: every PPO trial runs once per training seed (``ppo.seeds``); an *instance* is a trial at
one seed index, named ``prompt`` (index 0) or ``prompt_seed1`` (:func:`instance_name`); its PPO
seed is ``ppo.seed`` plus the index. The reward net is trained once and serves every seed; a trial
waits for the instance of its ``after`` trial with its own seed when that trial is seeded
(:attr:`TrialSpec.awaits`).

Every other module asks this registry (:data:`TRIALS`, :func:`trial`) what a trial is; none
compares trial names. The PPO trials are symmetrical: same algorithm config, same loop, same
metrics; they differ only in the environment class and its keywords (:func:`env_kwargs`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from envs.environments import PostProcessEnv, PromptSelectionEnv, RewardGuidedPromptEnv
from envs.normalisation import NormalisedObservation, ObservationStats
from envs.rollout import final_prompts
from envs.sample import Sample
from envs.segmentation_env import SegmentationEnv
from envs.sources import DataRef, load_split
from models.reward_net import MaskScorer, RewardPrediction, RewardScorer, load_checkpoint
from orchestrator.config import PpoConfig, RunConfig, config_to_dict, parse_config
from orchestrator.run_dir import RunPaths
from orchestrator.training.trial_status import wait_for

if TYPE_CHECKING:
    from models.segmentation import Segmenter


@dataclass(frozen=True)
class Trial:
    """One trial of the registry.

    Attributes:
        name: the trial's name (Tune's ``config["trial"]``, directory prefix, summary key).
        experiment: the experiment it belongs to (``config.experiments`` names these).
        env_class: the environment a PPO trial learns in; ``None`` for supervised trials.
        method: the evaluation method of its policy (``eval/per_image.csv``), or ``None``.
        needs_reward_net: its environment scores masks with the run's reward net (and so it
            waits for the reward-net trial: ``after``).
        trains_reward_net: it trains the run's reward network (step 1 of experiment 3).
        uses_gpu: it trains on a GPU when the plan leaves one for trials (reserves
            ``gpu_mem_mb``); the PPO trials sample and learn on the CPU.
        head_objective: it fine-tunes the backend's mask head (:mod:`models.heads`) against
            ``"reward"`` (the reward net, no labels) or ``"labels"``; ``None`` otherwise.
        after: the trial of the same run whose READY this one waits for before it needs its
            outputs (:func:`~orchestrator.training.trial_status.wait_for`), or ``None``; the
            trial runs only when that one does.
        starts_from_after: its episodes start from the mask of the prompt the ``after``
            trial's policy (same seed) chooses per image (the combined trial); that trial
            hands its policy off (:mod:`orchestrator.training.handoff`).
    """

    name: str
    experiment: str
    env_class: type[SegmentationEnv] | None = None
    method: str | None = None
    needs_reward_net: bool = False
    trains_reward_net: bool = False
    uses_gpu: bool = False
    head_objective: str | None = None
    after: str | None = None
    starts_from_after: bool = False

    @property
    def is_ppo(self) -> bool:
        return self.env_class is not None

    @property
    def seeded(self) -> bool:
        """It trains a learner from a seed, and so runs once per training seed (``ppo.seeds``):
        the PPO trials and the fine-tuned heads."""
        return self.is_ppo or self.head_objective is not None


PROMPT = Trial("prompt", "prompt", PromptSelectionEnv, "prompt_rl")
POSTPROCESS = Trial("postprocess", "postprocess", PostProcessEnv, "postprocess_rl")
REWARD_NET = Trial("reward_net", "reward", trains_reward_net=True, uses_gpu=True)
REWARD_GUIDED = Trial(
    "reward_guided",
    "reward",
    RewardGuidedPromptEnv,
    "reward_rl",
    needs_reward_net=True,
    after=REWARD_NET.name,
)
COMBINED = Trial(
    "combined",
    "postprocess",
    PostProcessEnv,
    "combined",
    after=PROMPT.name,
    starts_from_after=True,
)
REWARD_FINETUNE = Trial(
    "reward_finetune",
    "finetune",
    method="reward_finetune",
    needs_reward_net=True,
    uses_gpu=True,
    head_objective="reward",
    after=REWARD_NET.name,
)
SUPERVISED_FINETUNE = Trial(
    "supervised_finetune",
    "finetune",
    method="supervised_finetune",
    uses_gpu=True,
    head_objective="labels",
)
TRIALS: tuple[Trial, ...] = (
    PROMPT,
    POSTPROCESS,
    REWARD_NET,
    REWARD_GUIDED,
    COMBINED,
    REWARD_FINETUNE,
    SUPERVISED_FINETUNE,
)
"""Every trial, in launch order (reward_net before the trials that need it)."""
HEAD_TRIALS: tuple[Trial, ...] = tuple(t for t in TRIALS if t.head_objective)
HEAD_METHODS: tuple[str, ...] = tuple(t.method for t in HEAD_TRIALS if t.method)
"""Evaluation methods that come from a fine-tuned mask head."""
PPO_TRIALS: tuple[Trial, ...] = tuple(t for t in TRIALS if t.is_ppo)
RL_METHODS: tuple[str, ...] = tuple(t.method for t in PPO_TRIALS if t.method)
"""Evaluation methods that come from a trained policy."""
SEED_SEPARATOR = "_seed"
ENV_NAME = "sa2va_rl_experiment"
"""The one name registered with Tune; ``env_config["trial"]`` picks the class."""

_BY_NAME = {t.name: t for t in TRIALS}


def trial(name: str) -> Trial:
    """The registry entry of ``name`` (a trial or an instance name, see
    :func:`parse_instance`); ``KeyError`` names the known trials."""
    return parse_instance(name)[0]


def hands_off(spec: Trial) -> bool:
    """Whether another trial starts from this one's policy (``starts_from_after``)."""
    return any(t.after == spec.name and t.starts_from_after for t in TRIALS)


def instance_name(spec: Trial, seed: int) -> str:
    """The name of ``spec`` at seed index ``seed``: ``prompt``, ``prompt_seed1``, ..."""
    return spec.name if seed == 0 else f"{spec.name}{SEED_SEPARATOR}{seed}"


def parse_instance(name: str) -> tuple[Trial, int]:
    """(registry entry, seed index) of an instance name; ``KeyError`` names the known trials."""
    base, _, seed = name.partition(SEED_SEPARATOR)
    if base not in _BY_NAME or (seed and not seed.isdigit()):
        raise KeyError(f"unknown trial {name!r}; known: {', '.join(_BY_NAME)}")
    return _BY_NAME[base], int(seed or 0)


def instances(spec: Trial, config: RunConfig) -> list[str]:
    """The instance names ``spec`` runs as: one per training seed for a seeded trial (PPO, a
    fine-tuned head), else one."""
    return [instance_name(spec, k) for k in range(config.ppo.seeds if spec.seeded else 1)]


def instance_names(config: RunConfig) -> list[str]:
    """Every trial instance of a run, in launch order (each trial's seeds together)."""
    return [name for t in trials_for(config) for name in instances(t, config)]


def _included(spec: Trial, experiments: Sequence[str]) -> bool:
    return spec.experiment in experiments and (
        not spec.starts_from_after or _BY_NAME[str(spec.after)].experiment in experiments
    )


def trials_for(config: RunConfig) -> list[Trial]:
    """The trials a config asks for, in launch order (a trial before those that wait for it):
    a trial that starts from another's policy only with that trial's experiment; a trial
    another one waits for comes with it."""
    return _with_awaited([t for t in TRIALS if _included(t, config.experiments)])


def trials_of_experiment(experiment: str) -> list[Trial]:
    """The trials of one experiment (``prompt``, ``postprocess``, ``reward`` or ``finetune``)
    that need no other experiment's policy, and those they wait for (``after``), in order."""
    return _with_awaited([t for t in TRIALS if _included(t, (experiment,))])


def _with_awaited(chosen: list[Trial]) -> list[Trial]:
    awaited = {t.after for t in chosen if t.after}
    return [t for t in TRIALS if t in chosen or t.name in awaited]


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial runs from: typed here, plain data only in Tune's ``param_space``
    (:meth:`to_param` / :meth:`from_param` are that one edge).

    Attributes:
        trial: the registry entry.
        run: the resolved run config.
        root: the run directory.
        run_id: the run's id: the trial finds its run's segmentation workers and status board
            by it when it starts (:mod:`orchestrator.run_id`), never from a list frozen into
            its config, so a resumed run may have more or fewer workers.
        backend_id: the workers' backend id (ties checkpoints and policies to it).
        data: the run's data reference (every data setting; the split manifest and its hash).
        gpu_mem_mb: GPU memory this trial reserved (a GPU-using trial on a plan that left some
            for trials); 0: it runs on the CPU.
        seed: the seed index (``0 .. ppo.seeds - 1``): PPO seed ``ppo.seed + seed``, head
            fine-tuning seed ``finetune.seed + seed``.
    """

    trial: Trial
    run: RunConfig
    root: str
    run_id: str
    backend_id: str
    data: DataRef
    gpu_mem_mb: int = 0
    seed: int = 0

    @property
    def name(self) -> str:
        """The instance name (:func:`instance_name`): Tune's ``config["trial"]``."""
        return instance_name(self.trial, self.seed)

    @property
    def awaits(self) -> str | None:
        """The instance this one waits for: its ``after`` trial, at this seed when that trial
        runs once per seed (:attr:`Trial.seeded`), else its one instance."""
        if self.trial.after is None:
            return None
        before = trial(self.trial.after)
        return instance_name(before, self.seed if before.seeded else 0)

    @property
    def ppo(self) -> PpoConfig:
        """The run's PPO settings with this instance's seed."""
        return self.run.ppo.model_copy(update={"seed": self.run.ppo.seed + self.seed})

    @property
    def manifest_hash(self) -> str:
        """The split manifest's hash (ties checkpoints and policies to the split)."""
        return self.data.manifest_hash

    @property
    def paths(self) -> RunPaths:
        return RunPaths(Path(self.root))

    def to_param(self) -> dict[str, Any]:
        """The plain-data form Tune stores in ``params.json``."""
        return {
            "trial": self.name,
            "run": config_to_dict(self.run),
            "root": self.root,
            "run_id": self.run_id,
            "backend_id": self.backend_id,
            "data": self.data.to_dict(),
            "gpu_mem_mb": self.gpu_mem_mb,
        }

    @classmethod
    def from_param(cls, param: Mapping[str, Any]) -> TrialSpec:
        """The spec back from :meth:`to_param`'s form (in the trial's process)."""
        spec, seed = parse_instance(str(param["trial"]))
        return cls(
            trial=spec,
            seed=seed,
            run=parse_config(dict(param["run"]), source="trial config"),
            root=str(param["root"]),
            run_id=str(param["run_id"]),
            backend_id=str(param["backend_id"]),
            data=DataRef.from_dict(param["data"]),
            gpu_mem_mb=int(param.get("gpu_mem_mb", 0)) if spec.uses_gpu else 0,
        )


@dataclass(frozen=True)
class TrialOutcome:
    """How one trial ended, as every later stage reads it (from Tune or the local runner).

    Attributes:
        name: the trial's name.
        status: ``TERMINATED`` or ``ERROR``.
        checkpoint: its latest checkpoint directory (PPO trials: holds ``best_policy.pt``).
    """

    name: str
    status: str
    checkpoint: Path | None


def env_settings(spec: Trial, config: RunConfig) -> dict[str, Any]:
    """The config's keywords for the trial's environment class (episode, prompts, mask ops);
    the samples, segmenter and reward scorer are injected by :func:`build_env`."""
    env = config.env
    common: dict[str, Any] = {
        "max_steps": env.steps_for(spec.experiment),
        "recall_weight": env.recall_weight,
    }
    if spec.env_class is PostProcessEnv:
        return {**common, "base_prompt": env.default_prompt, "mask_ops": dict(config.mask_ops)}
    return {**common, "prompts": list(env.prompts), "default_prompt": env.default_prompt}


def build_env(
    spec: Trial,
    config: RunConfig,
    samples: Sequence[Sample],
    segmenter: Segmenter,
    reward_scorer: MaskScorer | None = None,
    base_prompts: Mapping[str, str] | None = None,
) -> SegmentationEnv:
    """The trial's environment over ``samples`` and ``segmenter`` with the config's settings
    (``reward_scorer``: the run's reward net, for a trial that needs one; ``base_prompts``:
    image id -> the prompt a post-processing episode starts from, for a trial with ``after``)."""
    if spec.env_class is None:
        raise ValueError(f"trial {spec.name!r} has no environment")
    kwargs = env_settings(spec, config)
    if base_prompts is not None:
        kwargs["base_prompts"] = dict(base_prompts)
    if spec.needs_reward_net:
        if reward_scorer is None:
            raise ValueError(f"trial {spec.name!r} needs the run's reward net")
        kwargs["reward_net"] = reward_scorer
    return spec.env_class(samples=samples, segmenter=segmenter, **kwargs)


def run_reward_scorer(spec: TrialSpec) -> RewardScorer:
    """The run's reward net, refused unless made for this run's backend and split."""
    return load_checkpoint(
        spec.paths.reward_net, backend_id=spec.backend_id, manifest_hash=spec.manifest_hash
    )


class RunRewardNet:
    """The run's reward net, loaded when it first scores a mask: an env of the reward-guided
    trial can be built (and its observation statistics fitted) while step 1 still trains.

    The first :meth:`score` waits for the trial's ``after`` (the reward-net trial) to be READY
    (it raises at once, with the reason, when that trial FAILED) and loads the checkpoint
    (:func:`run_reward_scorer`).
    """

    def __init__(self, spec: TrialSpec) -> None:
        self.spec = spec
        self._scorer: RewardScorer | None = None

    def load(self) -> RewardScorer:
        if self._scorer is None:
            wait_for(self.spec)
            self._scorer = run_reward_scorer(self.spec)
        return self._scorer

    def score(self, image: np.ndarray, mask: np.ndarray) -> RewardPrediction:
        return self.load().score(image, mask)


def trial_env(
    spec: TrialSpec, segmenter: Segmenter, split: str, max_images: int | None
) -> SegmentationEnv:
    """The environment of ``spec`` on ``split`` of the run's data (loaded once per process);
    a trial that needs the reward net gets :class:`RunRewardNet` (loaded on first use); a
    trial that ``starts_from_after`` waits for that trial's policy and starts every image from
    the prompt it chooses (:func:`prompts_after`)."""
    samples = load_split(spec.data, split, max_images)
    scorer = RunRewardNet(spec) if spec.trial.needs_reward_net else None
    starts = spec.trial.starts_from_after
    base_prompts = prompts_after(spec, segmenter, samples) if starts else None
    return build_env(spec.trial, spec.run, samples, segmenter, scorer, base_prompts)


def prompts_after(
    spec: TrialSpec, segmenter: Segmenter, samples: Sequence[Sample]
) -> dict[str, str]:
    """Image id -> the prompt the policy of the instance ``spec`` waits for ends on, once that
    instance is READY (blocks until then; it handed its policy off before)."""
    from orchestrator.training.handoff import policy_path
    from orchestrator.training.ppo import ExportedPolicy

    assert spec.awaits is not None, "only a trial with `after` starts from another's policy"
    wait_for(spec)
    policy = ExportedPolicy.load(policy_path(spec.paths, spec.awaits))
    env = build_env(trial(spec.awaits), spec.run, samples, segmenter)
    return final_prompts(env, policy.act, [s.id for s in samples])


def make_env(env_config: Mapping[str, Any]) -> gym.Env[Any, Any]:
    """Env creator registered with Tune: ``{"spec": TrialSpec.to_param(), "segmenter"}`` ->
    the trial's training environment, behind the fixed observation normalisation when
    ``env_config["obs_stats"]`` holds one (:meth:`ObservationStats.to_dict`)."""
    spec = TrialSpec.from_param(env_config["spec"])
    env = trial_env(spec, env_config["segmenter"], "train", spec.run.data.max_train_images)
    return behind_normalisation(env, env_config)


def behind_normalisation(
    env: gym.Env[Any, Any], env_config: Mapping[str, Any]
) -> gym.Env[Any, Any]:
    """``env`` behind the fixed normalisation of ``env_config["obs_stats"]`` (as
    :meth:`ObservationStats.to_dict` wrote it), or ``env`` itself when there is none."""
    stats = env_config.get("obs_stats")
    return env if stats is None else NormalisedObservation(env, ObservationStats.from_dict(stats))
