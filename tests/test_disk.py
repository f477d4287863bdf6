"""A full or too small disk: the plan refuses before anything starts, every writer's ENOSPC
becomes one message (path, free space, "free space, then --resume") with a non-zero exit, the
files written before stay whole, and a torn Tune state is restored from the project's copy.

ENOSPC is injected for real inside the writers (``SA2VA_RL_INJECT_ENOSPC``, the hook every
writer calls), not mocked around them.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
from fakes import random_image

from models.segmentation import Segmentation, image_digest
from orchestrator import disk, run_dir
from orchestrator.cli import main
from orchestrator.disk import (
    INJECT_ENV,
    DiskFullError,
    DiskNeed,
    disk_full_path,
    plan_disk,
)
from orchestrator.inference.cache import CacheKey, InferenceCache
from orchestrator.run_dir import TUNE_STATE_BACKUP, RunPaths
from orchestrator.training import disk_watch
from orchestrator.training.disk_watch import DiskWatch, backup_tune_state, repair_tune_state

CONFIGS = Path(__file__).resolve().parents[1] / "tune_configs"
MB = 10**6


# --- the plan --------------------------------------------------------------------------------


def test_plan_adds_needs_per_filesystem_and_refuses_with_figures(tmp_path: Path) -> None:
    needs = [DiskNeed("cache", tmp_path / "c", 300 * MB), DiskNeed("tune", tmp_path / "r", 50 * MB)]
    plan = plan_disk(needs, free=lambda _: 320 * MB)
    (volume,) = plan.volumes
    assert (volume.need, volume.free, volume.fits) == (350 * MB, 320 * MB, False)
    with pytest.raises(DiskFullError) as err:
        plan.require()
    assert str(err.value).startswith(
        f"not enough disk space for this run: {tmp_path / 'c'} needs 350.0 MB (cache, tune) "
        "but has 320.0 MB free"
    )
    plan_disk(needs, free=lambda _: 350 * MB).require()  # exactly enough fits


def test_each_fine_tuned_model_is_planned_at_its_export_size(tmp_path: Path) -> None:
    """A Sa2VA export copies the checkpoint: its weight bytes (read from the folder) + slack per
    head trial; a Frangi export is a small head folder."""
    from orchestrator.config import load_config
    from orchestrator.disk import FRANGI_HEAD_EXPORT_BYTES, SA2VA_EXPORT_SLACK_BYTES, run_needs_of

    folder = tmp_path / "model"
    folder.mkdir()
    header = json.dumps(
        {"w": {"dtype": "BF16", "shape": [1000, 1000], "data_offsets": [0, 2 * MB]}}
    )
    (folder / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header.encode() + bytes(2 * MB)
    )
    (folder / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    paths = RunPaths(tmp_path / "run")
    sa2va = load_config(
        CONFIGS / "smoke.yaml", {"backend": {"name": "sa2va", "model_path": str(folder)}}
    )
    (export,) = [n for n in run_needs_of(sa2va, paths, 0, (64, 64)) if "fine-tuned" in n.what]
    assert export.what == "fine-tuned models, 2 exports"
    assert export.bytes == 2 * (2 * MB + SA2VA_EXPORT_SLACK_BYTES)
    assert export.path == paths.root / "finetune"
    frangi = load_config(CONFIGS / "smoke.yaml")
    (small,) = [n for n in run_needs_of(frangi, paths, 0, (64, 64)) if "fine-tuned" in n.what]
    assert small.bytes == 2 * FRANGI_HEAD_EXPORT_BYTES
    two_seeds = load_config(CONFIGS / "smoke.yaml", {"ppo": {"seeds": 2}})
    (seeded,) = [n for n in run_needs_of(two_seeds, paths, 0, (64, 64)) if "fine-tuned" in n.what]
    assert seeded.what == "fine-tuned models, 4 exports"


def test_run_too_big_for_the_disk_is_refused_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(disk, "free_bytes", lambda _: 5 * MB)
    args = ["run", "--config", str(CONFIGS / "smoke.yaml"), "--output", str(tmp_path / "run")]
    code = main([*args, "--cache-dir", str(tmp_path / "cache"), "--no-dashboard"])
    err = capsys.readouterr().err
    assert code == 2 and not ray.is_initialized()
    assert "not enough disk space for this run" in err and "has 5.0 MB free" in err
    assert str(tmp_path / "cache") in err and "Traceback" not in err
    assert not (tmp_path / "run" / "tune").exists() and not (tmp_path / "cache").exists()
    monkeypatch.undo()  # the corrected re-run is not blocked: it gets past the plan
    assert RunPaths(tmp_path / "run").is_attempt_before_tune()


# --- writers ---------------------------------------------------------------------------------


def test_injected_enospc_names_the_path_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "reward_net" / "status.json"
    run_dir.write_text(target, "before")
    monkeypatch.setenv(INJECT_ENV, "status.json")
    with pytest.raises(OSError) as err:
        run_dir.write_text(target, "after")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert target.read_text() == "before"
    assert [p.name for p in target.parent.iterdir()] == ["status.json"]  # no temp file left


def test_cache_write_on_a_full_disk_is_raised_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = InferenceCache(tmp_path)
    key = CacheKey("fake-v1", image_digest(random_image(0, 8)), "p")
    earlier = CacheKey("fake-v1", image_digest(random_image(1, 8)), "p")
    seg = Segmentation(mask=np.zeros((8, 8), bool))
    cache.put(earlier, seg)
    monkeypatch.setenv(INJECT_ENV, ".entry")
    with pytest.raises(OSError) as err:
        cache.put(key, seg)
    assert disk_full_path(err.value) == str(cache.path(key))
    assert cache.counters()["disk_write_errors"] == 1
    monkeypatch.delenv(INJECT_ENV)
    assert InferenceCache(tmp_path).get(earlier, (8, 8)) is not None  # the earlier entry is whole


@pytest.mark.parametrize(
    "error, path",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/r/a.pt"), "/r/a.pt"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), ""),
        (RuntimeError("wrapped"), None),
        (Exception("OSError: [Errno 28] No space left on device: '/r/tune/x'\n"), "/r/tune/x"),
        (Exception("pyarrow: IOError: No space left on device"), ""),
        (PermissionError(errno.EACCES, "Permission denied", "/r/x"), None),
    ],
)
def test_disk_full_is_found_in_errors_and_their_text(error: Exception, path: str | None) -> None:
    assert disk_full_path(error) == path


def test_disk_full_inside_a_chain_is_found() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/r/report.md")
        except OSError as inner:
            raise RuntimeError("Tune failed") from inner
    except RuntimeError as outer:
        assert disk_full_path(outer) == "/r/report.md"


def test_run_command_turns_a_full_disk_into_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import orchestrator.pipeline as pipeline

    report = tmp_path / "run" / "report.md"

    def full_at_report(options: object) -> int:
        run_dir.write_text(report, "# report")
        return 0

    monkeypatch.setattr(pipeline, "run", full_at_report)
    monkeypatch.setenv(INJECT_ENV, "report.md")
    code = main(["run", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"the disk is full: could not write {report} (" in err
    assert f"then continue with `sa2va-rl run --output {tmp_path / 'run'} --resume`" in err


# --- the driver's watch and Tune's state -----------------------------------------------------


def test_watch_stops_tune_on_a_trial_that_hit_a_full_disk(tmp_path: Path) -> None:
    error_file = tmp_path / "error.txt"
    error_file.write_text("Failure # 1\nOSError: [Errno 28] No space left on device: '/r/x.pt'\n")
    watch = DiskWatch(tmp_path / "tune", [tmp_path])
    watch.on_trial_error(0, [], SimpleNamespace(error_file=str(error_file)))
    with pytest.raises(OSError) as err:
        watch.on_step_begin(1, [])
    assert err.value.errno == errno.ENOSPC and err.value.filename == "/r/x.pt"


def test_watch_names_the_fullest_disk_when_the_error_names_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    error_file = tmp_path / "error.txt"
    error_file.write_text(
        "OSError: [Errno 28] Error writing bytes to file. "
        "Detail: [errno 28] No space left on device"
    )
    monkeypatch.setattr(disk_watch, "free_bytes", lambda p: 100 if p.name == "run" else 10**12)
    watch = DiskWatch(tmp_path / "tune", [tmp_path / "cache", tmp_path / "run"])
    watch.on_trial_recover(0, [], SimpleNamespace(error_file=str(error_file)))
    assert watch.full == str(tmp_path / "run")


def test_watch_stops_tune_when_a_watched_disk_fills(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = DiskWatch(tmp_path / "tune", [tmp_path / "run", tmp_path / "cache"])
    watch.on_step_begin(0, [])  # plenty of space: nothing happens
    monkeypatch.setattr(disk_watch, "free_bytes", lambda p: 0 if p.name == "cache" else 10**12)
    watch._polled = 0.0
    with pytest.raises(OSError) as err:
        watch.on_step_begin(1, [])
    assert err.value.filename == str(tmp_path / "cache")


def _tune_state(tune_dir: Path, trials: str) -> None:
    run_dir.write_text(tune_dir / "experiment_state-2026.json", json.dumps({"trials": trials}))
    run_dir.write_bytes(tune_dir / "basic-variant-state-2026.json", b"\x80\x05 a pickle")
    run_dir.write_bytes(tune_dir / "tuner.pkl", b"pickle")


def test_torn_tune_state_is_restored_from_the_last_good_copy(tmp_path: Path) -> None:
    tune_dir = tmp_path / "tune"
    _tune_state(tune_dir, "good")
    backup_tune_state(tune_dir, tmp_path / TUNE_STATE_BACKUP)
    (tune_dir / "experiment_state-2026.json").write_text('{"trials": "go')  # torn by ENOSPC
    backup_tune_state(tune_dir, tmp_path / TUNE_STATE_BACKUP)  # a torn set is not copied
    message = repair_tune_state(tune_dir)
    assert message is not None and "restored the last good copy" in message
    assert json.loads((tune_dir / "experiment_state-2026.json").read_text()) == {"trials": "good"}
    assert (tune_dir / "experiment_state-2026.json.torn").exists()
    assert repair_tune_state(tune_dir) is None  # whole now: nothing to do


def test_torn_tune_state_without_a_copy_says_every_trial_starts_over(tmp_path: Path) -> None:
    tune_dir = tmp_path / "tune"
    _tune_state(tune_dir, "good")
    (tune_dir / "tuner.pkl").write_bytes(b"")
    message = repair_tune_state(tune_dir)
    assert message is not None and "every trial starts over" in message and "tuner.pkl" in message
    assert sorted(p.name for p in tune_dir.iterdir()) == [
        "basic-variant-state-2026.json.torn",
        "experiment_state-2026.json.torn",
        "tuner.pkl.torn",
    ]
