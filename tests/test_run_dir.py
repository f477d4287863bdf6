"""The run directory's one atomic write, the failed-attempt rule, and the experiment registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from envs.sources import DataRef
from orchestrator.config import CONFIG_DIR, EXPERIMENTS, load_config
from orchestrator.experiments import (
    HEAD_METHODS,
    PPO_TRIALS,
    RL_METHODS,
    TRIALS,
    TrialSpec,
    hands_off,
    trial,
    trials_for,
)
from orchestrator.run_dir import RunPaths, write_bytes, write_json


def test_write_bytes_replaces_whole_files_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "file.bin"
    write_bytes(target, b"first")
    write_bytes(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_write_json_ends_with_a_newline(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}\n'


def test_an_attempt_that_stopped_before_tune_blocks_nothing(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    paths.config.write_text("mode: smoke\n")
    paths.synthetic_data.mkdir()
    (paths.synthetic_data / "annotations.json").write_text("[]")
    assert paths.is_attempt_before_tune()
    paths.clear_attempt_before_tune()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", ["tune", "notes.txt"])
def test_a_started_run_or_foreign_files_still_block(tmp_path: Path, extra: str) -> None:
    paths = RunPaths(tmp_path)
    paths.config.write_text("mode: smoke\n")
    (tmp_path / extra).mkdir() if extra == "tune" else (tmp_path / extra).write_text("mine")
    assert not paths.is_attempt_before_tune()


def test_registry_names_every_trial_once_in_launch_order() -> None:
    assert [t.name for t in TRIALS] == [
        "prompt",
        "postprocess",
        "reward_net",
        "reward_guided",
        "combined",
        "reward_finetune",
        "supervised_finetune",
    ]
    assert [t.name for t in PPO_TRIALS] == ["prompt", "postprocess", "reward_guided", "combined"]
    assert RL_METHODS == ("prompt_rl", "postprocess_rl", "reward_rl", "combined")
    assert HEAD_METHODS == ("reward_finetune", "supervised_finetune")
    assert [t.name for t in TRIALS if t.uses_gpu] == [
        "reward_net",
        "reward_finetune",
        "supervised_finetune",
    ]
    assert [t.name for t in TRIALS if t.needs_reward_net] == ["reward_guided", "reward_finetune"]
    assert {t.name: t.after for t in TRIALS if t.after} == {
        "reward_guided": "reward_net",
        "combined": "prompt",
        "reward_finetune": "reward_net",
    }
    # Only the combined trial starts from another's policy (reward_guided only waits).
    assert [t.name for t in TRIALS if t.starts_from_after] == ["combined"]
    assert [t.name for t in TRIALS if hands_off(t)] == ["prompt"]
    assert {t.experiment for t in TRIALS} == set(EXPERIMENTS)  # the schema's names
    config = load_config(CONFIG_DIR / "smoke.yaml")
    assert trials_for(config) == list(TRIALS)
    with pytest.raises(KeyError, match="unknown trial 'nope'; known: prompt, postprocess"):
        trial("nope")


def test_trial_spec_survives_tunes_param_space() -> None:
    spec = TrialSpec(
        trial=trial("reward_guided"),
        run=load_config(CONFIG_DIR / "smoke.yaml"),
        root="/runs/x",
        run_id="run-20261204-101500-abcdef",
        backend_id="frangi-v1",
        data=DataRef("/data", "/runs/x/split_manifest.json", "abc", skip_bad=True),
        gpu_mem_mb=0,
    )
    param = spec.to_param()
    assert param["trial"] == "reward_guided" and param["data"]["skip_bad"] is True
    assert TrialSpec.from_param(param) == spec
