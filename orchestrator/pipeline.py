"""``sa2va-rl run``: data -> split -> GPU plan -> shared workers -> Tune trials -> evaluation ->
report, in one process that is also the ``ray job submit`` entrypoint.

Every stage prints a numbered line with its wall time, so a user sees where a long run is. All
outputs live in the run directory (see :mod:`orchestrator.run_dir`); a run
interrupted at any point continues with ``--resume``: the data, split and config are reused,
finished trials are not redone (Tune restores the experiment), and inference comes from the
disk cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from models.errors import UserError
from orchestrator.cluster import (
    check_model_source,
    check_shared_storage,
    gpu_memory_lines,
    gpu_plan,
    start_ray,
    start_segmentation_workers,
)
from orchestrator.config import (
    CONFIG_DIR,
    RunConfig,
    config_to_dict,
    load_config,
    parse_config,
    with_overrides,
)
from orchestrator.data import PreparedData, prepare_data
from orchestrator.experiments import trials_for
from orchestrator.run_dir import RunPaths, write_json, write_text

if TYPE_CHECKING:
    from envs.sample import Sample
    from orchestrator.inference.client import SegmentationClient

log = logging.getLogger(__name__)

EXPERIMENT_NAME = "experiments"
DEFAULT_CONFIG = CONFIG_DIR / "quick.yaml"
RESUME_MAY_CHANGE = ("--num-cpus", "--address", "--no-dashboard")
"""Flags a resumed run may give differently: where and on what it runs, not what it computes
(fewer CPUs mean fewer CPU workers; the trials find whatever workers the resume started)."""
PATH_KEYS = frozenset({"data.path", "backend.model_path", "workers.cache_dir"})
"""Config keys compared as paths on ``--resume`` (two spellings of one folder agree)."""


@dataclass
class RunOptions:
    """What the command line says about a run (see ``sa2va-rl run --help``)."""

    config: str | None = None
    data: str | None = None
    backend: str | None = None
    model_path: str | None = None
    output: str | None = None
    address: str | None = None
    resume: bool = False
    dashboard: bool = True
    num_cpus: int | None = None
    cache_dir: str | None = None
    inventory: str | None = None
    experiments: tuple[str, ...] | None = None

    def overrides(self) -> dict[str, Any]:
        """Config keys the flags override (nested, like the YAML)."""
        out: dict[str, Any] = {}
        if self.experiments is not None:
            out["experiments"] = list(self.experiments)
        if self.data is not None:
            out.setdefault("data", {})["path"] = self.data
        if self.backend is not None:
            out.setdefault("backend", {})["name"] = self.backend
        if self.model_path is not None:
            out.setdefault("backend", {})["model_path"] = self.model_path
        if self.cache_dir is not None:
            out.setdefault("workers", {})["cache_dir"] = self.cache_dir
        if self.inventory is not None:
            out.setdefault("gpu", {})["inventory"] = self.inventory
        return out


@dataclass
class StageClock:
    """Prints ``[i/n] stage ...`` lines and keeps each stage's wall time for the summary."""

    total: int
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        index = len(self.seconds) + 1
        print(f"[{index}/{self.total}] {what} ...", flush=True)
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - start, 2)
        print(f"[{index}/{self.total}] {what}: done in {self.seconds[name]:.1f} s", flush=True)


# --- the run directory ---------------------------------------------------------------------------
def default_output(options: RunOptions) -> str:
    """``runs/<mode>`` of the config the flags name (``--config``, else the quick config), so
    ``--config tune_configs/full.yaml`` without ``--output`` writes ``runs/full``; with
    ``--resume`` the same rule finds the run that command started."""
    return f"runs/{load_config(options.config or DEFAULT_CONFIG, options.overrides()).mode}"


def resolve_config(options: RunOptions, paths: RunPaths) -> RunConfig:
    """The run's config: the saved one when resuming (flags must not contradict it,
    :func:`check_resume_flags`)."""
    if options.resume and paths.config.is_file():
        saved = parse_config(yaml.safe_load(paths.config.read_text()), source=str(paths.config))
        check_resume_flags(options, saved, paths)
        check_model_source(saved, local=options.address is None)
        return saved
    if options.resume:
        raise UserError(
            f"--resume: {paths.root} holds no run to resume (no {paths.config.name}); "
            "start it without --resume"
        )
    config = load_config(options.config or DEFAULT_CONFIG, options.overrides())
    # Before the run directory exists: a fixed re-run may reuse it.
    check_model_source(config, local=options.address is None)
    if paths.root.exists() and any(paths.root.iterdir()):
        if not paths.is_attempt_before_tune():
            raise UserError(
                f"output directory {paths.root} already holds files; pass --resume to continue "
                "that run, or choose another --output"
            )
        print(f"  {paths.root}: an earlier attempt stopped before Tune started; starting over")
        paths.clear_attempt_before_tune()
    paths.root.mkdir(parents=True, exist_ok=True)
    write_text(paths.config, yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return config


def check_resume_flags(options: RunOptions, saved: RunConfig, paths: RunPaths) -> None:
    """Refuse a ``--resume`` whose ``--config`` or flags (``--data``, ``--backend``,
    ``--model-path``, ``--cache-dir``, ``--inventory``, ``--experiment``) give a config key
    another value than the run started with, naming each such key; the flags of
    :data:`RESUME_MAY_CHANGE` may differ."""
    if options.config is not None:
        asked = load_config(options.config, options.overrides())
        source = f"{options.config} with the flags given"
    else:
        asked = with_overrides(saved, options.overrides(), source="the flags given")
        source = "the flags given"
    differing = _differing_keys(config_to_dict(saved), config_to_dict(asked))
    if differing:
        raise UserError(
            f"--resume: {source} contradict the config this run started with ({paths.config}): "
            f"{'; '.join(differing)}. Resume without them (the saved config is used), or start "
            f"a new run with another --output. ({', '.join(RESUME_MAY_CHANGE)} may differ.)"
        )


def _differing_keys(saved: dict[str, Any], asked: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: this run has X, asked Y`` for every leaf key whose values differ."""
    found = []
    for key in sorted(set(saved) | set(asked)):
        name, old, new = f"{prefix}{key}", saved.get(key), asked.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differing_keys(old, new, f"{name}.")
        elif old != new and not (name in PATH_KEYS and _same_path(old, new)):
            found.append(f"{name}: this run has {old!r}, asked {new!r}")
    return found


def _same_path(a: Any, b: Any) -> bool:
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


# --- Ray: GPU plan, cluster, workers ------------------------------------------------------------
def warm_up_samples(config: RunConfig, prepared: PreparedData) -> list[Sample]:
    """Every image the run segments (training, reward-net validation and test images, as
    capped by the config), each once."""
    from envs.sources import load_split

    rl_cap, net_cap = config.data.max_train_images, config.reward_net.max_images
    splits = {
        "train": None if rl_cap is None or net_cap is None else max(rl_cap, net_cap),
        "val": net_cap,
        "test": config.data.max_eval_images,
    }
    ids: dict[str, Sample] = {}
    for split, cap in splits.items():
        for sample in load_split(prepared.ref, split, cap):
            ids[sample.id] = sample
    return list(ids.values())


def check_disk(config: RunConfig, paths: RunPaths, prepared: PreparedData) -> None:
    """Print the disk plan (:mod:`orchestrator.disk`) and refuse it, before Ray or any worker
    starts, when the run's outputs do not fit. Pairs already cached count nothing where the
    backend id is known before its workers load (Frangi); for Sa2VA every pair counts."""
    from models.segmentation import image_digest
    from orchestrator.disk import plan_disk, run_needs_of
    from orchestrator.inference.cache import CacheKey, InferenceCache

    samples = warm_up_samples(config, prepared)
    cached = 0
    if config.backend.name == "frangi" and samples:
        from models.backends import make_segmenter

        backend_id = make_segmenter("frangi").backend_id
        cache = InferenceCache(Path(config.workers.cache_dir).expanduser())
        for sample in samples:
            digest = image_digest(sample.image)
            for prompt in config.env.prompts:
                path = cache.path(CacheKey(backend_id, digest, prompt))
                cached += path is not None and path.is_file()
    hw = samples[0].image.shape[:2] if samples else (0, 0)
    pairs = len(samples) * len(config.env.prompts) - cached
    plan = plan_disk(run_needs_of(config, paths, pairs, (int(hw[0]), int(hw[1]))))
    for line in plan.format().splitlines()[1:]:
        if not line.startswith("    "):
            print(f"  disk {line.strip()}")
    plan.require()


def warm_up(client: SegmentationClient, config: RunConfig, prepared: PreparedData) -> int:
    """Segment every (image, prompt) pair the run will need once, with a progress bar, so the
    trials start on a warm cache. Returns the number of images."""
    from tqdm import tqdm

    from orchestrator.inference.warmup import warm_up_pool

    ids = warm_up_samples(config, prepared)
    images = [sample.image for sample in ids]
    with tqdm(total=len(images), desc="  segmenting (cache warm-up)", unit="image") as bar:
        report = warm_up_pool(client, images, config.env.prompts, on_image=lambda: bar.update())
    print(
        f"  {report.pairs} (image, prompt) pairs: {report.computed} computed, {report.cached} "
        f"cached; images per worker {list(report.images_per_worker)} ({report.shared} shared)"
    )
    for line in gpu_memory_lines(client.stats()["workers"]):
        print(f"  {line}")
    return len(ids)


def run(options: RunOptions) -> int:
    """The whole job; returns the exit code."""
    import ray

    from orchestrator.inference.client import (
        SegmentationClient,
        SegmentationRequestError,
        SegmentationWorkerUnavailableError,
    )
    from orchestrator.run_id import ensure_run_id
    from orchestrator.training import tuner as tuning
    from orchestrator.training.trial_status import start_board

    started = time.monotonic()
    paths = RunPaths(Path(options.output or default_output(options)).expanduser().resolve())
    clock = StageClock(total=7)
    with clock.stage("config", f"config and run directory {paths.root}"):
        config = resolve_config(options, paths)
        if options.resume and paths.tune_dir.exists() and not paths.run_id.is_file():
            raise UserError(
                f"--resume: {paths.root} was started by an earlier sa2va-rl whose trials name "
                "their workers instead of their run (it has no run_id file); this version "
                "cannot resume its trials: start a new run with another --output"
            )
        run_id = ensure_run_id(paths)
        names = [t.name for t in trials_for(config)]
        print(f"  run {run_id}, mode {config.mode}, backend {config.backend.name}, trials {names}")
    with clock.stage("data", "data and split"):
        prepared = prepare_data(config, paths)
        check_disk(config, paths, prepared)
    try:
        with clock.stage("ray", "GPU plan, Ray and segmentation workers"):
            plan = None if options.address else gpu_plan(config, None)
            start_ray(options, plan)
            start_board(run_id, str(paths.root))
            if options.address:
                check_shared_storage(config, paths, prepared)
                plan = gpu_plan(config, options.address)
            if plan is not None:
                write_json(paths.gpu_plan, plan.to_json())
            # Every refusal the plan can make comes here, before any worker starts.
            trial_gpu_mb = tuning.trial_gpu_mem_mb(config, plan)
            workers = start_segmentation_workers(config, plan, run_id)
            client = SegmentationClient(workers)
            print(f"  workers {workers}, backend {client.backend_id}")
        with clock.stage("warmup", "cache warm-up"):
            warm_up(client, config, prepared)
        with clock.stage("tune", "Tune: experiments as concurrent trials"):
            from orchestrator.evaluation.references import start_reference_evaluation

            # The policy-free methods use the cores the trials leave idle (see the module).
            references = start_reference_evaluation(config, paths, prepared, client)
            grid = tuning.fit(
                options, config, paths, run_id, prepared, client.backend_id, trial_gpu_mb
            )
            trials = tuning.outcomes(grid)
        with clock.stage("evaluate", "evaluation on the test split"):
            from orchestrator.evaluation.stage import best_policy_paths, evaluate_run, head_models

            evaluate_run(
                config,
                paths,
                prepared,
                client,
                best_policy_paths(trials),
                ray.get(references),
                head_models(paths, trials),
            )
        with clock.stage("report", "summary and report"):
            from orchestrator.report import summary as report

            inference = client.stats(union_pairs=True)
            facts = report.build_summary(
                config,
                prepared,
                trials,
                inference,
                clock.seconds,
                started,
                client.backend_id,
            )
            facts["gpu_memory"] = [
                w["gpu_memory"] for w in inference["workers"] if w.get("gpu_memory")
            ]
            write_json(paths.summary, facts)
            # The report is rebuilt from the files just written, exactly as `sa2va-rl report`
            # rebuilds it, so both give the same bytes.
            summary = report.write_report(paths)
            print(report.comparison_table(summary))
    except (SegmentationRequestError, SegmentationWorkerUnavailableError) as err:
        raise UserError(
            f"the run stopped: {err} What finished is kept in {paths.root}: continue with "
            "--resume once the cause is gone."
        ) from None
    finally:
        if ray.is_initialized():
            ray.shutdown()
    print(f"run directory: {paths.root} (summary.json, report.md, tune/)")
    return 0 if all(s == "TERMINATED" for s in summary["trials"].values()) else 1
