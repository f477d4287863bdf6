"""Trial B waits for trial A (``Trial.after``) on the run's status board, whatever kills A.

Without Ray: the board as an object (``train --local``). With Ray and Tune: the board actor and
the driver's :class:`StatusCallback`, with a trial SIGKILL-ed on every attempt.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import ray

from envs.sources import DataRef
from models.errors import UserError
from orchestrator.config import CONFIG_DIR, load_config
from orchestrator.experiments import TrialSpec, trial
from orchestrator.run_dir import RunPaths
from orchestrator.run_id import new_run_id
from orchestrator.training import trial_status as status


def _spec(name: str, root: Path, run_id: str, experiments: tuple[str, ...] = ()) -> TrialSpec:
    run = load_config(
        CONFIG_DIR / "smoke.yaml", {"experiments": list(experiments)} if experiments else None
    )
    return TrialSpec(trial(name), run, str(root), run_id, "frangi", DataRef(str(root)))


def _wait_in_thread(spec: TrialSpec) -> tuple[threading.Thread, dict[str, str]]:
    outcome: dict[str, str] = {}

    def wait() -> None:
        try:
            status.wait_for(spec, poll_s=0.01)
            outcome["ready"] = "yes"
        except UserError as err:
            outcome["error"] = str(err)

    thread = threading.Thread(target=wait)
    thread.start()
    return thread, outcome


def test_the_waiting_trial_stops_with_the_reason_once_the_awaited_trial_failed(
    tmp_path: Path,
) -> None:
    run_id = new_run_id()
    board = status.host_locally(run_id, str(tmp_path))
    waiter, outcome = _wait_in_thread(_spec("reward_guided", tmp_path, run_id))
    awaited = _spec("reward_net", tmp_path, run_id)
    with pytest.raises(RuntimeError, match="boom"), status.reporting(awaited):
        raise RuntimeError("boom")
    assert board.get("reward_net") == status.TrialStatus("RUNNING")  # Tune may still retry
    board.fail("reward_net", "Tune: its process ended")  # the driver's word when Tune gives up
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert outcome == {
        "error": "the reward_net trial failed (RuntimeError: boom), so the reward_guided trial "
        "cannot go on; see tune/reward_net_*/error.txt in the run directory"
    }
    record = RunPaths(tmp_path).trial_status("reward_net").read_text()
    assert '"state": "FAILED"' in record and "RuntimeError: boom" in record


def test_a_retry_forgets_the_last_error_and_ready_releases_the_wait(tmp_path: Path) -> None:
    run_id = new_run_id()
    board = status.host_locally(run_id, str(tmp_path))
    board.note_error("reward_net", "RuntimeError: first attempt")
    waiter, outcome = _wait_in_thread(_spec("reward_guided", tmp_path, run_id))
    with status.reporting(_spec("reward_net", tmp_path, run_id)):
        assert board.get("reward_net") == status.TrialStatus("RUNNING")
    waiter.join(timeout=30)
    assert outcome == {"ready": "yes"}
    board.fail("reward_net", "Tune: killed")
    assert board.get("reward_net") == status.TrialStatus("FAILED", "Tune: killed")


def test_the_signal_does_not_need_the_disk(tmp_path: Path) -> None:
    blocked = tmp_path / "run"
    blocked.write_text("a file where the run directory should be: no record can be written")
    run_id = new_run_id()
    board = status.host_locally(run_id, str(blocked))
    board.fail("reward_net", "Tune: its process ended")
    with pytest.raises(UserError, match=r"reward_net trial failed \(Tune: its process ended\)"):
        status.wait_for(_spec("reward_guided", blocked, run_id), poll_s=0.01)


def test_a_trial_whose_awaited_trial_is_not_in_the_run_is_refused(tmp_path: Path) -> None:
    run_id = new_run_id()
    status.host_locally(run_id, str(tmp_path))
    spec = _spec("reward_guided", tmp_path, run_id, experiments=("prompt",))
    with pytest.raises(UserError, match="needs the reward_net trial, which this run's experi"):
        status.wait_for(spec)
    assert trial("prompt").after is None
    status.wait_for(_spec("prompt", tmp_path, run_id))  # waits for nothing


# --- Ray + Tune: the driver sees a SIGKILL-ed trial ----------------------------------------------
def _killed_or_waiting(param: dict[str, Any]) -> None:
    spec = TrialSpec.from_param(param)
    with status.reporting(spec):
        if spec.trial.trains_reward_net:
            os.kill(os.getpid(), signal.SIGKILL)  # no code of the trial's runs after this
        status.wait_for(spec, poll_s=0.1)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_sigkilled_awaited_trial_stops_the_waiting_trial_with_the_reason(
    tmp_path: Path,
) -> None:
    from ray import tune

    from orchestrator.inference.transport import NAMESPACE
    from orchestrator.training.tuner import StatusCallback

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        namespace=NAMESPACE,
    )
    try:
        run_id = new_run_id()
        status.start_board(run_id, str(tmp_path))
        specs = [
            _spec(name, tmp_path, run_id).to_param() for name in ("reward_net", "reward_guided")
        ]
        tuner = tune.Tuner(
            tune.with_resources(_killed_or_waiting, {"cpu": 0.5}),
            param_space={**specs[0], "trial": tune.grid_search(["reward_net", "reward_guided"])},
            run_config=tune.RunConfig(
                storage_path=str(tmp_path),
                name="tune",
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[StatusCallback(run_id)],
                verbose=0,
            ),
        )
        grid = tuner.fit()
        errors = {str(r.config["trial"]): str(r.error) for r in grid}
        found = status.board(run_id).get("reward_net")
    finally:
        ray.shutdown()
    assert found is not None and found.state == "FAILED"
    assert found.reason.startswith("Tune: ") and "died" in found.reason
    assert "the reward_net trial failed (Tune: " in errors["reward_guided"]
    assert "so the reward_guided trial cannot go on" in errors["reward_guided"]
