"""The one config schema: every ``tune_configs/*.yaml`` is validated here before Ray starts.

Variants compose a base instead of copying it (Hydra's pattern): a file may say
``extends: base.yaml`` (relative to itself) and then override any subset of keys; mappings merge
recursively, everything else replaces. Unknown keys, wrong types and out-of-range values are
rejected with the dotted key, the value and what is allowed.

pydantic does the type and range checking: it reports every bad key at once with its location,
which hand-written dataclass validation would have to re-implement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from models.errors import UserError
from models.prompts import CANDIDATE_PROMPTS, DEFAULT_PROMPT, DEFAULT_PROMPT_SET, PROMPT_SETS
from orchestrator.config_files import describe_error, merge, read_yaml

CONFIG_DIR = Path(__file__).parent / "tune_configs"
"""The shipped configs: ``orchestrator/tune_configs``, a link to the checkout's
``tune_configs/`` and a real folder in an installed wheel (package data), so a plain
``pip install .`` finds them as an editable install does."""
Experiment = Literal["prompt", "postprocess", "reward", "finetune"]
EXPERIMENTS: tuple[Experiment, ...] = ("prompt", "postprocess", "reward", "finetune")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class DataConfig(_Section):
    path: str | None = None
    """Dataset directory (annotations.json, COCO JSON, or images/+masks/). None: the built-in
    synthetic angiograms, generated into the run directory."""
    format: Literal["auto", "sa2va", "coco", "folders"] = "auto"
    """Dataset format; auto detects it from the files present."""
    group_pattern: str | None = "default"
    """Regex with a named group ``group`` applied to file stems ("default": the original
    ``<name>(<id>)_<a>-<b>_<c>_<hash>_frame_<n>`` naming; null: one group per image)."""
    skip_bad: bool = False
    """Skip (and report) bad entries instead of stopping."""
    synthetic_n: int = Field(160, ge=12, le=100_000)
    """Frames of the built-in synthetic dataset."""
    synthetic_seed: int = Field(0, ge=0)
    """Seed of the built-in synthetic dataset."""
    synthetic_frames_per_video: int = Field(8, ge=1, le=1000)
    """Frames per video of the built-in synthetic dataset: fewer, shorter videos give the
    test split more videos (what the video-level CIs resample)."""
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    """Train/val/test image shares; whole groups (videos) are assigned to one split."""
    split_seed: int = Field(0, ge=0)
    """Seed of the group shuffle."""
    max_train_images: int | None = Field(None, ge=1)
    """Use at most this many training images for RL (the original quick mode used 20)."""
    max_eval_images: int | None = Field(None, ge=1)
    """Evaluate on at most this many test images (None: all)."""

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> DataConfig:
        if any(f < 0 for f in self.split_fractions) or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(
                f"split_fractions must be three non-negative shares summing to 1, "
                f"got {list(self.split_fractions)}"
            )
        return self


class BackendConfig(_Section):
    name: Literal["frangi", "sa2va"] = "frangi"
    """Segmentation backend: frangi (CPU, classical, built in) or sa2va (the real model)."""
    model_path: str | None = None
    """Sa2VA: local folder or hub id (a hub id needs ``revision``). Frangi: an exported
    fine-tuned head (``RUN/finetune/<trial>/model``), or None for the plain backend."""
    revision: str | None = None
    """Sa2VA: pinned 40-hex commit of a hub id."""
    model_size: Literal["1B", "4B", "8B", "26B"] | None = None
    """Sa2VA size, for the GPU memory plan. The plan reads the weights from the model folder
    (or a Hub id's cached snapshot) and refuses a size the folder contradicts; the declared
    size is used only where the folder cannot be read (None there: 4B)."""
    device: str = "auto"
    """Sa2VA: auto or cuda (the current CUDA GPU), cuda:N, or cpu. Sa2VA needs CUDA: auto never
    falls back to the CPU; cpu must be asked for explicitly and is slow, for debugging with a
    model whose code does not hard-code CUDA."""
    allow_unpinned_remote_code: bool = False
    """Allow trust_remote_code from a hub id without a pinned revision (unsafe)."""
    max_new_tokens: int = Field(64, ge=1, le=2048)
    """Sa2VA: most answer tokens generated per prompt (upstream allows 2,048). Its answers
    ("Sure, [SEG].") take about 5; a longer answer is cut and its result flagged
    ``answer_truncated``. Part of the backend id (a cut answer can differ)."""
    runtime_env: dict[str, Any] | None = None
    """Sa2VA: a Ray runtime_env of the segmentation workers' own, e.g.
    ``{pip: ["transformers==4.51.3"]}`` for a v1 checkpoint; the workers then check the model
    against their environment, the driver only the source and device."""


class GpuConfig(_Section):
    inventory: str | None = None
    """Declared GPUs ``TOTAL:USED`` in GB, comma-separated, nodes separated by ``;``.
    None: read with NVML."""
    model_gb: float | None = Field(None, gt=0)
    """Override the backend's footprint (GB)."""
    margin_gb: float = Field(1.0, ge=0)
    """Safety margin kept free on every GPU (GB)."""


class WorkersConfig(_Section):
    cpu_workers: Literal["auto"] | int = "auto"
    """Segmentation workers when no GPU is planned (the CPU backend). "auto": one per CPU Ray
    sees, at most 8 (:func:`cpu_worker_count`). Workers reserve no logical CPU, so the trials
    that start after the warm-up are scheduled as if they were not there; once the cache is
    warm they only serve cache hits."""
    cache_dir: str = "~/.cache/sa2va-rl/inference"
    """Inference cache shared by runs (memory + disk); put it on shared storage on a cluster."""
    memory_cache_mb: int = Field(512, ge=0)
    """Per-worker in-memory cache bound."""

    @field_validator("cpu_workers", mode="before")
    @classmethod
    def _count_or_auto(cls, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
            raise ValueError(f'use "auto" or a whole number from 1 to 64, got {value!r}')
        return value


MAX_AUTO_CPU_WORKERS = 8
"""The most workers ``cpu_workers: auto`` starts: each holds its own memory cache
(``memory_cache_mb``), and the warm-up gains little once workers outnumber the cores."""


def cpu_worker_count(setting: int | Literal["auto"], cpus: float) -> int:
    """The CPU workers to start for ``workers.cpu_workers`` on a cluster with ``cpus`` CPUs:
    the number itself, or for "auto" one per whole CPU (at least 1, at most
    :data:`MAX_AUTO_CPU_WORKERS`)."""
    if setting != "auto":
        return int(setting)
    return max(1, min(MAX_AUTO_CPU_WORKERS, int(cpus)))


def _one_prompt_decision() -> dict[Experiment, int]:
    return {"prompt": 1, "reward": 1}


class EnvConfig(_Section):
    max_steps: int = Field(3, ge=1, le=50)
    """Steps per episode (one image per episode) of every experiment not in ``episode_steps``;
    also the depth of the post-processing oracle and of the op-sequence baselines."""
    episode_steps: dict[Experiment, int] = Field(default_factory=_one_prompt_decision)
    """Steps per episode by experiment, overriding ``max_steps``. Default: one prompt decision
    per image (a contextual bandit) for the prompt and reward-guided experiments: a prompt step
    replaces the mask, so in a longer episode only the last prompt counts. The original team's
    3-step prompt episodes: ``{prompt: 3, reward: 3}``."""
    prompt_set: Literal["seeds", "clinical"] = "seeds"
    """Named candidate list: seeds (the original team's 11 prompts, verbatim) or clinical (the
    project's earlier list). Fills ``prompts`` when that is not given."""
    prompts: tuple[str, ...] = CANDIDATE_PROMPTS
    """Candidate prompts the prompt policies choose from (default: the ``prompt_set``'s)."""
    default_prompt: str = DEFAULT_PROMPT
    """Prompt of the baseline; episodes of the prompt envs start from its mask (default: the
    first of ``prompts``)."""
    recall_weight: float = Field(0.0, ge=0, le=1)
    """Objective = (1 - w) * Dice + w * Recall for the ground-truth rewards."""

    @model_validator(mode="before")
    @classmethod
    def _prompts_from_set(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = dict(values)
        name = values.get("prompt_set", DEFAULT_PROMPT_SET)
        if name not in PROMPT_SETS:
            return values  # the Literal check names the allowed sets
        named = PROMPT_SETS[name]
        if "prompts" not in values:
            values["prompts"] = named
        elif name != DEFAULT_PROMPT_SET and tuple(values["prompts"] or ()) != named:
            # The default set stays in a saved config beside a user's own list: only another
            # named set contradicts it.
            raise ValueError(
                f"give either prompt_set ({name!r}) or your own prompts list, not both"
            )
        if "default_prompt" not in values and values["prompts"]:
            values["default_prompt"] = values["prompts"][0]
        return values

    @model_validator(mode="after")
    def _default_prompt_is_a_candidate(self) -> EnvConfig:
        if len(self.prompts) < 2:
            raise ValueError("prompts must list at least 2 candidates")
        if self.default_prompt not in self.prompts:
            raise ValueError(f"default_prompt {self.default_prompt!r} must be one of prompts")
        bad = {exp: n for exp, n in self.episode_steps.items() if not 1 <= n <= 50}
        if bad:
            raise ValueError(f"episode_steps must be between 1 and 50, got {bad}")
        return self

    def steps_for(self, experiment: str) -> int:
        """Steps per episode of ``experiment`` (``episode_steps``, else ``max_steps``)."""
        steps = {str(exp): n for exp, n in self.episode_steps.items()}
        return steps.get(experiment, self.max_steps)


class PpoConfig(_Section):
    total_env_steps: int = Field(2000, ge=1)
    """Environment steps per PPO experiment."""
    num_envs: int = Field(2, ge=1, le=64)
    """Vectorised environments per PPO trial."""
    lr: float = Field(3e-4, gt=0, le=1)
    """Adam learning rate of policy and value network (RLlib's default is 5e-5)."""
    gamma: float = Field(0.99, ge=0, le=1)
    """Discount factor of future rewards."""
    gae_lambda: float = Field(0.95, ge=0, le=1)
    """GAE lambda: 1 is Monte-Carlo returns, 0 one-step TD (RLlib's default is 1.0)."""
    clip_param: float = Field(0.2, gt=0, le=1)
    """PPO's clip range of the probability ratio (RLlib's default is 0.3)."""
    entropy_coeff: float = Field(0.01, ge=0)
    """Weight of the entropy bonus (keeps exploring prompts and ops)."""
    vf_loss_coeff: float = Field(0.5, ge=0)
    """Weight of the value-function loss in the total loss."""
    train_batch_size: int = Field(256, ge=8)
    """Env steps per PPO iteration."""
    minibatch_size: int = Field(64, ge=1)
    """Env steps per gradient step (at most ``train_batch_size``)."""
    num_epochs: int = Field(10, ge=1)
    """Passes over each iteration's batch."""
    hidden: tuple[int, ...] = (128, 64)
    """Separate policy and value MLPs with these hidden sizes."""
    seed: int = Field(0, ge=0)
    """Seed of RLlib (network init, sampling) and of the envs' image choice."""
    seeds: int = Field(1, ge=1, le=20)
    """Training seeds: every PPO trial runs once per seed (``seed``, ``seed + 1``, ...), and so
    does every fine-tuned head (``finetune.seed + k``), all in the one Tune experiment on the
    same workers; the report gives each method's mean over its seeds with a CI that resamples
    seeds and test videos."""
    normalize_observations: bool = True
    """Standardise every observation feature with the mean/std of random-policy observations on
    the training images (no ground truth), fixed before training and saved with the policy.
    False: raw observations, the original team's setting (PPO then ignores the image)."""
    normalization_steps: int = Field(512, ge=8)
    """Random-policy env steps the normalisation statistics are computed from."""

    @model_validator(mode="after")
    def _minibatch_fits(self) -> PpoConfig:
        if self.minibatch_size > self.train_batch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must not exceed "
                f"train_batch_size ({self.train_batch_size})"
            )
        return self


class RewardNetConfig(_Section):
    input_size: int = Field(128, ge=32, le=1024)
    """Side the (image, mask) pair is resized to (area interpolation keeps thin vessels)."""
    epochs: int = Field(12, ge=1)
    """Training epochs; the epoch with the lowest validation MAE is kept."""
    batch_size: int = Field(32, ge=2)
    """Examples per step (at least 2: the network uses BatchNorm)."""
    lr: float = Field(2e-3, gt=0, le=1)
    """Peak learning rate of Adam's one-cycle schedule."""
    samples_per_image: int = Field(24, ge=1)
    """Masks per image: every prompt's mask, then random post-processing sequences (fewer than
    the prompt count: a random subset of the prompt masks)."""
    max_images: int | None = Field(None, ge=2)
    """Train on at most this many train-split images and validate on at most this many val
    images (None: the whole splits)."""
    seed: int = Field(0, ge=0)
    soft_per_image: int = Field(6, ge=0)
    """Of ``samples_per_image``, how many are perturbed soft masks (a prompt's soft mask with a
    random logit shift and smooth noise, scored by its hard mask ``> 0.5``): what a fine-tuned
    head outputs, so the reward net scores those honestly too. Taken from the post-processing
    sequences' share."""


class FinetuneConfig(_Section):
    """The ``finetune`` experiment: the backend's mask head fine-tuned on the training images,
    against the reward net (``reward_finetune``, no labels) or the labels
    (``supervised_finetune``, the reference)."""

    method: Literal["reward_gradient", "policy_gradient"] = "reward_gradient"
    """How ``reward_finetune`` follows the reward net: its gradient through the soft mask, or
    per-pixel REINFORCE on sampled hard masks (RL4Seg's kind of update)."""
    steps: int = Field(40, ge=1)
    """Optimiser steps."""
    batch_images: int = Field(8, ge=1)
    """Training images per step."""
    lr: float = Field(3e-3, gt=0, le=1)
    """Adam learning rate."""
    kl_weight: float = Field(1.0, ge=0)
    """``reward_finetune``: weight of the mean per-pixel KL(head || initial head)."""
    pg_samples: int = Field(4, ge=2)
    """``policy_gradient``: hard masks sampled per image (their mean score is the baseline)."""
    eval_every: int = Field(10, ge=1)
    """Steps between evaluations on the val images (the reward-hacking curve); the head kept is
    the evaluation with the best reward-net score (reward_finetune: no labels) or val Dice
    (supervised_finetune)."""
    max_images: int | None = Field(None, ge=1)
    """At most this many train images to train on and val images to select with (None: all)."""
    seed: int = Field(0, ge=0)


class RunConfig(_Section):
    mode: str = "custom"
    """Name shown in reports (smoke, quick, full)."""
    experiments: tuple[Experiment, ...] = EXPERIMENTS
    """Which experiments to run. Default: all, except ``finetune`` where the backend has no
    fine-tunable head here (:func:`finetune_supported`)."""
    data: DataConfig = DataConfig()
    backend: BackendConfig = BackendConfig()
    gpu: GpuConfig = GpuConfig()
    workers: WorkersConfig = WorkersConfig()
    env: EnvConfig = EnvConfig()
    ppo: PpoConfig = PpoConfig()
    reward_net: RewardNetConfig = RewardNetConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    mask_ops: dict[str, Any] = Field(default_factory=dict)
    """Post-processing operations and their parameters: keys of ``envs.mask_ops.MaskOpsConfig``
    (e.g. ``ops``, ``close_kernel``, ``threshold_step``); empty: its defaults."""

    @model_validator(mode="before")
    @classmethod
    def _default_experiments(cls, values: Any) -> Any:
        if not isinstance(values, dict) or "experiments" in values:
            return values
        backend = values.get("backend") or {}
        if isinstance(backend, dict) and finetune_supported(
            backend.get("name", "frangi"), backend.get("model_path")
        ):
            return values
        return {**values, "experiments": [e for e in EXPERIMENTS if e != "finetune"]}

    @model_validator(mode="after")
    def _finetune_has_a_head(self) -> RunConfig:
        backend = self.backend
        if "finetune" in self.experiments and not finetune_supported(
            backend.name, backend.model_path
        ):
            raise ValueError(
                "the finetune experiment fine-tunes a Sa2VA checkpoint's mask head or the plain "
                "Frangi backend's (backend.name frangi without backend.model_path); this run's "
                f"backend is {backend.name} with model_path {backend.model_path!r} (an exported "
                "Frangi head): leave finetune out of experiments"
            )
        return self

    @model_validator(mode="after")
    def _mask_ops_valid(self) -> RunConfig:
        from envs.mask_ops import MaskOpsConfig

        try:
            MaskOpsConfig.from_dict(dict(self.mask_ops))
        except UserError as err:
            raise ValueError(f"mask_ops: {err}") from None
        return self


def finetune_supported(backend: str, model_path: str | None) -> bool:
    """Whether the ``finetune`` experiment can run on this backend: any Sa2VA checkpoint
    (``models/sa2va/head.py``) or the plain Frangi backend (an exported Frangi head is not
    fine-tuned again)."""
    return backend == "sa2va" or (backend == "frangi" and model_path is None)


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a config mapping; a ``UserError`` lists every bad key with what is allowed."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        problems = "\n  ".join(describe_error(RunConfig, e) for e in err.errors())
        raise UserError(
            f"{source}: invalid config:\n  {problems}\n"
            "Every key is documented in orchestrator/config.py; fix or remove the keys above."
        ) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load ``path`` (following ``extends``), apply ``overrides`` (nested dict), validate."""
    resolved = Path(path).expanduser()
    data = read_yaml(resolved.resolve(), CONFIG_DIR)
    if overrides:
        data = merge(data, overrides)
    return parse_config(data, source=str(path))


def with_overrides(config: RunConfig, overrides: dict[str, Any], source: str) -> RunConfig:
    """``config`` with ``overrides`` (nested dict) applied, validated like a loaded one."""
    return parse_config(merge(config_to_dict(config), overrides), source=source)


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """Plain-YAML/JSON form (tuples as lists) of a resolved config, for the run directory."""
    return config.model_dump(mode="json")
