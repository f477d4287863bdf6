"""One experiment in one process: no Ray, no Tune, in-process segmentation workers.

:func:`train_locally` is ``sa2va-rl train --experiment NAME --local``: the same config, data
stage, trial functions and outputs per trial as ``sa2va-rl run``, run one trial after the other
in this process (step 1 of experiment 3 before step 2) against an in-process
:class:`~orchestrator.inference.worker.SegmentationWorker` (same backend, same disk cache).
Each trial writes into ``<output>/local/<trial>/``: TensorBoard events with the run's tags,
``best_policy.pt`` (PPO trials) and ``result.json`` (one JSON line per reported result, like
Tune's). Put a breakpoint anywhere: it is plain Python.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import run_dir
from orchestrator.data import prepare_data
from orchestrator.experiments import TrialOutcome, TrialSpec, trials_of_experiment
from orchestrator.inference.backend_spec import BackendSpec
from orchestrator.inference.client import SegmentationClient
from orchestrator.inference.worker import SegmentationWorker
from orchestrator.run_dir import RunPaths
from orchestrator.run_id import ensure_run_id
from orchestrator.training.trial_status import host_locally, reporting

if TYPE_CHECKING:
    from orchestrator.pipeline import RunOptions

LOCAL_DIR = "local"
"""Under the output directory: one directory per trial."""


class LocalSink:
    """:class:`~orchestrator.training.loop.ResultSink` writing ``result.json`` lines; it keeps
    no checkpoints (a local run starts fresh: it is for debugging, not for resuming)."""

    keeps_checkpoints = False

    def __init__(self, trial_dir: Path) -> None:
        self.trial_dir = trial_dir
        trial_dir.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []
        self.last: dict[str, float] = {}

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield None

    def report(self, metrics: Mapping[str, float], checkpoint: Path | None = None) -> None:
        self.last = {**self.last, **metrics}
        self.lines.append(json.dumps({**metrics, "timestamp": time.time()}))
        run_dir.write_text(self.trial_dir / "result.json", "\n".join(self.lines) + "\n")


def train_locally(options: RunOptions, experiment: str) -> list[TrialOutcome]:
    """Run every trial of ``experiment`` in this process; returns how each ended."""
    from orchestrator.cluster import backend_spec
    from orchestrator.pipeline import resolve_config
    from orchestrator.training.finetune import run_finetune
    from orchestrator.training.loop import train_ppo
    from orchestrator.training.reward_net import train_run_reward_net

    paths = RunPaths(Path(options.output or "runs/local").expanduser().resolve())
    config = resolve_config(options, paths)
    prepared = prepare_data(config, paths)
    name, backend_options = backend_spec(config)
    worker = SegmentationWorker(
        "local-worker-0",
        BackendSpec(name, backend_options),
        str(Path(config.workers.cache_dir).expanduser().resolve()),
        memory_cache_bytes=config.workers.memory_cache_mb * 2**20,
    )
    client = SegmentationClient.in_process([worker])
    print(f"  in-process worker, backend {client.backend_id}")
    run_id = ensure_run_id(paths)
    host_locally(run_id, str(paths.root))
    outcomes = []
    for trial in trials_of_experiment(experiment):
        spec = TrialSpec(trial, config, str(paths.root), run_id, client.backend_id, prepared.ref)
        sink = LocalSink(paths.root / LOCAL_DIR / trial.name)
        print(f"  trial {trial.name} -> {sink.trial_dir}", flush=True)
        with reporting(spec):
            if trial.trains_reward_net:
                train_run_reward_net(spec, client, sink)
            elif trial.head_objective:
                run_finetune(spec, client, sink)
            else:
                train_ppo(spec, client, sink, local=True)
        print(f"  trial {trial.name}: {_brief(sink.last)}", flush=True)
        outcomes.append(TrialOutcome(trial.name, "TERMINATED", sink.trial_dir))
    return outcomes


def _brief(metrics: Mapping[str, float]) -> str:
    shown = [f"{key} {value:.4g}" for key, value in sorted(metrics.items()) if "/" in key]
    return ", ".join(shown[:8]) or "no metrics"
