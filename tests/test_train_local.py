"""``sa2va-rl train --experiment NAME --local``: one experiment in one process, without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
from test_pipeline import read_scalar_tags

from orchestrator import metric_keys as mk
from orchestrator.cli import EXIT_USER_ERROR, main
from orchestrator.config import CONFIG_DIR


def _train(tmp_path: Path, *extra: str) -> int:
    return main(
        [
            "train",
            "--experiment",
            "prompt",
            "--local",
            "--config",
            str(CONFIG_DIR / "smoke.yaml"),
            "--output",
            str(tmp_path / "run"),
            "--cache-dir",
            str(tmp_path / "cache"),
            *extra,
        ]
    )


@pytest.mark.slow
def test_local_training_finishes_without_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if ray.is_initialized():
        ray.shutdown()

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", no_ray)
    assert _train(tmp_path) == 0
    assert not ray.is_initialized()
    trial_dir = tmp_path / "run" / "local" / "prompt"
    assert (trial_dir / "best_policy.pt").is_file()
    (events,) = trial_dir.glob("events.out.tfevents.*")
    tags = read_scalar_tags(events)
    assert {mk.EP_REW_MEAN, mk.EP_LEN_MEAN, mk.GT_DICE, mk.EVAL_DICE} <= tags
    results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    assert results[-1][mk.ENV_STEPS] >= 64
    assert 0.0 <= results[-1][mk.EVAL_DICE] <= 1.0
    assert not (tmp_path / "run" / "tune").exists()


def test_ray_flags_are_refused_with_local(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _train(tmp_path, "--num-cpus", "2", "--no-dashboard") == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "--num-cpus, --no-dashboard configure Ray or Tune; --local uses neither" in err
