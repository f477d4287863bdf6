"""End to end: a disk that fills during Tune stops the whole run in words, and ``--resume``
with space completes every trial.

The reward-net trial's first write (``reward_net/status.json``) hits ENOSPC, injected inside
the trial process (``SA2VA_RL_INJECT_ENOSPC``, inherited from the driver by Ray's workers): the
status cannot say FAILED, so without the driver's DiskWatch the reward-guided trial would wait
for it for hours.
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


def test_full_disk_during_tune_stops_in_words_and_resume_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, cache = tmp_path / "run", tmp_path / "cache"
    status = root / "reward_net" / "status.json"
    monkeypatch.setenv(INJECT_ENV, "reward_net/status.json")
    assert main(smoke_args(root, cache)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"sa2va-rl run: error: the disk is full: could not write {status} (")
    assert f"then continue with `sa2va-rl run --output {root} --resume`" in last
    assert not status.exists() and not (root / "summary.json").exists()
    manifest = (root / "split_manifest.json").read_bytes()
    entries = sorted(cache.rglob("*.entry"))
    assert entries  # the warm-up finished before Tune

    monkeypatch.delenv(INJECT_ENV)
    code = main(["run", "--output", str(root), "--resume", "--num-cpus", "2", "--no-dashboard"])
    assert code == 0
    summary = json.loads((root / "summary.json").read_text())
    names = [t.name for t in trials_for(load_config(str(root / "config.yaml")))]
    assert summary["trials"] == {name: "TERMINATED" for name in names}
    assert summary["inference"]["forward_passes"] == 0  # every earlier entry read back whole
    assert summary["inference"]["corrupt_entries"] == 0
    assert (root / "split_manifest.json").read_bytes() == manifest
    assert sorted(cache.rglob("*.entry")) == entries
    assert json.loads(status.read_text())["state"] == "READY"
