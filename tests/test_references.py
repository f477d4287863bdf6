"""The policy-free methods evaluated while the trials train (a low-priority Ray task in the
run) give exactly the rows and example masks of evaluating them afterwards, in-process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import SmokeRun

from orchestrator.config import parse_config
from orchestrator.data import prepare_data
from orchestrator.evaluation.stage import evaluate_run, head_models
from orchestrator.experiments import HEAD_TRIALS, PPO_TRIALS, TrialOutcome
from orchestrator.inference.backend_spec import BackendSpec
from orchestrator.inference.client import SegmentationClient
from orchestrator.inference.worker import SegmentationWorker
from orchestrator.run_dir import BEST_POLICY_FILE, RunPaths

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_references_during_training_equal_evaluating_them_after(
    smoke_run: SmokeRun, tmp_path: Path
) -> None:
    assert smoke_run.exit_code == 0
    copy = tmp_path / "run"
    shutil.copytree(smoke_run.root, copy)
    paths = RunPaths(copy)
    config = parse_config(yaml.safe_load(paths.config.read_text()), source=str(paths.config))
    prepared = prepare_data(config, paths)
    worker = SegmentationWorker("w0", BackendSpec("frangi"), str(smoke_run.cache_dir))
    client = SegmentationClient.in_process([worker])
    policies = {
        t.name: next((copy / "tune").glob(f"{t.name}_*/{BEST_POLICY_FILE}")) for t in PPO_TRIALS
    }
    heads = head_models(paths, [TrialOutcome(t.name, "TERMINATED", None) for t in HEAD_TRIALS])
    assert heads  # the smoke run fine-tunes both heads
    # references=None: computed here
    evaluate_run(config, paths, prepared, client, policies, head_folders=heads)

    run_eval, again = smoke_run.root / "eval", copy / "eval"
    assert (again / "per_image.csv").read_bytes() == (run_eval / "per_image.csv").read_bytes()
    masks = sorted(p.name for p in (run_eval / "examples").glob("*.png"))
    assert masks and masks == sorted(p.name for p in (again / "examples").glob("*.png"))
    for name in masks:
        saved, recomputed = run_eval / "examples" / name, again / "examples" / name
        assert recomputed.read_bytes() == saved.read_bytes()
    assert worker.stats()["forward_passes"] == 0  # everything came from the run's cache
