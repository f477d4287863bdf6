"""The reward-guided trial's explicit dependency on the reward-net trial (status.json)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

from envs.sources import DataRef
from models.errors import UserError
from models.frangi import FrangiSegmenter
from orchestrator.config import CONFIG_DIR, load_config
from orchestrator.experiments import TrialSpec, trial
from orchestrator.run_dir import RunPaths
from orchestrator.training import reward_net_status as status
from orchestrator.training.reward_net import train_run_reward_net


class ListSink:
    """A result sink that keeps the results in memory."""

    keeps_checkpoints = False

    def __init__(self, trial_dir: Path) -> None:
        self.trial_dir = trial_dir
        self.results: list[dict[str, float]] = []

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield None

    def report(self, metrics: Mapping[str, float], checkpoint: Path | None = None) -> None:
        self.results.append(dict(metrics))


def _spec(root: Path, data_dir: Path) -> TrialSpec:
    return TrialSpec(
        trial=trial("reward_net"),
        run=load_config(CONFIG_DIR / "smoke.yaml"),
        root=str(root),
        workers=(),
        backend_id="frangi",
        data=DataRef(str(data_dir)),
    )


def test_a_failing_reward_net_trial_stops_the_reward_guided_wait_with_its_reason(
    tmp_path: Path,
) -> None:
    paths = RunPaths(tmp_path / "run")
    waited: dict[str, object] = {}

    def reward_guided() -> None:
        start = time.monotonic()
        try:
            status.wait_for_reward_net(paths, poll_s=0.05)
        except UserError as err:
            waited["error"] = str(err)
        waited["seconds"] = time.monotonic() - start

    waiter = threading.Thread(target=reward_guided)
    waiter.start()
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(UserError, match="does not exist"):
        train_run_reward_net(_spec(paths.root, missing), FrangiSegmenter(), ListSink(tmp_path))
    waiter.join(timeout=60)
    assert not waiter.is_alive(), "the reward-guided wait did not stop on FAILED"
    assert status.read_status(paths) == status.RewardNetStatus(
        "FAILED", f"UserError: dataset path {missing} does not exist; pass a dataset folder or JSON"
    )
    assert "the reward-net trial failed (UserError: dataset path" in str(waited["error"])
    assert float(str(waited["seconds"])) < 60


def test_a_retry_says_running_again_and_ready_releases_the_wait(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    status.write_status(paths, status.FAILED, "RuntimeError: boom")
    with status.reporting_status(paths):
        assert status.read_status(paths) == status.RewardNetStatus("RUNNING")
    assert status.read_status(paths) == status.RewardNetStatus("READY")
    status.wait_for_reward_net(paths, poll_s=0.01)


def test_a_resumed_run_forgets_the_previous_failure(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    status.write_status(paths, status.FAILED, "RuntimeError: boom")
    status.clear_failed(paths)
    assert status.read_status(paths) is None
