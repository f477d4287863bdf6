"""End to end: a disk that fills during Tune stops the whole run in words, and ``--resume``
with space completes every trial.

Every PPO trial's first checkpoint hits ENOSPC, injected inside the trial processes
(``SA2VA_RL_INJECT_ENOSPC``, inherited from the driver by Ray's workers): the driver's DiskWatch
ends the Tune experiment at the first such failure (Tune would otherwise retry each trial), the
run ends in words, and the reward-guided trial waits for nothing. Experiments 1 and 3 only (a
PPO trial, the reward net and a trial that waits for it): the others add minutes, not behaviour.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import smoke_args

from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.disk import INJECT_ENV
from orchestrator.experiments import trials_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EXPERIMENTS = ("--experiment", "prompt", "--experiment", "reward")


def test_full_disk_stops_in_words_and_resume_never_trains_a_finished_trial_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, cache = tmp_path / "run", tmp_path / "cache"
    monkeypatch.setenv(INJECT_ENV, "/checkpoint")
    assert main(smoke_args(root, cache, *EXPERIMENTS)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    # The injected path is the trial's own staging copy of its checkpoint (Tune persists it
    # into tune/ afterwards); a real full disk names whichever file failed.
    assert last.startswith("sa2va-rl run: error: the disk is full: could not write /")
    assert "/checkpoint (" in last and " free there now)" in last
    assert f"then continue with `sa2va-rl run --output {root} --resume`" in last
    assert not (root / "summary.json").exists()
    manifest = (root / "split_manifest.json").read_bytes()
    entries = sorted(cache.rglob("*.entry"))
    assert entries  # the warm-up finished before Tune
    names = [t.name for t in trials_for(load_config(str(root / "config.yaml")))]

    # Resumed with the report's disk full: every trial finishes, the report cannot be written.
    monkeypatch.setenv(INJECT_ENV, "report.md")
    resume = ["run", "--output", str(root), "--resume", "--num-cpus", "2", "--no-dashboard"]
    assert main(resume) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"the disk is full: could not write {root / 'report.md'} (" in last
    trained = {p: p.read_bytes() for p in (root / "tune").glob("*/result.json")}
    assert len(trained) == len(names)

    # Resumed with space: nothing is trained again, the report is written.
    monkeypatch.delenv(INJECT_ENV)
    assert main(resume) == 0
    assert {p: p.read_bytes() for p in (root / "tune").glob("*/result.json")} == trained
    assert (root / "report.md").is_file()
    summary = json.loads((root / "summary.json").read_text())
    assert summary["trials"] == {name: "TERMINATED" for name in names}
    assert summary["inference"]["forward_passes"] == 0  # every earlier entry read back whole
    assert summary["inference"]["corrupt_entries"] == 0
    assert (root / "split_manifest.json").read_bytes() == manifest
    assert sorted(cache.rglob("*.entry")) == entries
