"""The main job end to end: a smoke run on 2 logical CPUs, its outputs, resuming a killed run."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import SmokeRun, smoke_args
from ray import tune
from tensorboardX.proto import event_pb2

from orchestrator import experiments as registry
from orchestrator import metric_keys as mk
from orchestrator.cli import main
from orchestrator.run_dir import RunPaths

TRIALS = {t.name for t in registry.TRIALS}  # every trial (test_run_dir pins the registry)
PPO_TRIALS = {"prompt", "postprocess", "reward_guided", "combined"}
# The end-to-end runs below need a PPO trial, the reward net and a trial that waits for it, not
# every trial: experiments 1 and 3 keep them to 3 trials instead of 7.
CHAIN = ("--experiment", "prompt", "--experiment", "reward")
CHAIN_TRIALS = {"prompt", "reward_net", "reward_guided"}


def read_scalar_tags(event_file: Path) -> set[str]:
    """Scalar tags of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    tags = set()
    data = event_file.read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        record = data[offset + 12 : offset + 12 + length]
        offset += 12 + length + 4
        event = event_pb2.Event.FromString(record)
        tags.update(value.tag for value in event.summary.value)
    return tags


def trial_dirs(root: Path) -> dict[str, Path]:
    found = {}
    for params in (root / "tune").glob("*/params.json"):
        found[json.loads(params.read_text())["trial"]] = params.parent
    return found


def test_smoke_run_finishes_with_all_trials_terminated(smoke_run: SmokeRun) -> None:
    assert smoke_run.exit_code == 0
    summary = json.loads((smoke_run.root / "summary.json").read_text())
    assert summary["mode"] == "smoke" and summary["backend"] == "frangi"
    assert summary["trials"] == {t: "TERMINATED" for t in TRIALS}
    assert summary["splits"] == {"train": 8, "val": 8, "test": 8}
    assert set(summary["methods"]) >= {
        "baseline",
        "prompt_rl",
        "postprocess_rl",
        "reward_rl",
        "reward_finetune",
        "supervised_finetune",
    }
    for method in summary["methods"].values():
        assert method["n"] == 6  # max_eval_images of smoke.yaml
        assert {"dice", "recall", "precision", "iou"} <= set(method)
    inference = summary["inference"]
    assert inference["workers"] == 2  # cpu_workers: auto on --num-cpus 2
    # A cold cache: each distinct (image, prompt) pair costs exactly one forward pass. The run
    # needs 8 train + 8 val + 6 test images (smoke.yaml caps) x 11 prompts.
    assert inference["forward_passes"] == inference["distinct_pairs"] == 22 * 11
    assert inference["oom_retries"] == 0
    assert summary["wall_seconds"] > 0
    for name in ("config.yaml", "split_manifest.json", "report.md"):
        assert (smoke_run.root / name).is_file()


def test_tensorboard_files_have_the_original_tags(smoke_run: SmokeRun) -> None:
    dirs = trial_dirs(smoke_run.root)
    assert set(dirs) == TRIALS
    original = {mk.EP_REW_MEAN, mk.EP_LEN_MEAN, mk.GT_DICE, mk.BEST_REWARD}
    for trial in PPO_TRIALS:
        tags = set().union(
            *(read_scalar_tags(f) for f in dirs[trial].glob("events.out.tfevents.*"))
        )
        assert original <= tags, (trial, original - tags)
        assert mk.EVAL_DICE in tags and mk.POLICY_LOSS in tags
    guided = set().union(
        *(read_scalar_tags(f) for f in dirs["reward_guided"].glob("events.out.tfevents.*"))
    )
    assert mk.REWARD_NET_SCORE in guided
    net = set().union(
        *(read_scalar_tags(f) for f in dirs["reward_net"].glob("events.out.tfevents.*"))
    )
    assert mk.REWARD_NET_VAL_MAE in net
    for trial in ("reward_finetune", "supervised_finetune"):
        tags = set().union(
            *(read_scalar_tags(f) for f in dirs[trial].glob("events.out.tfevents.*"))
        )
        assert {mk.GT_DICE, mk.FINETUNE_LOSS} <= tags, trial
    # The reward-net score of the supervised head needs a reward net ready when it starts.
    finetuned = set().union(
        *(read_scalar_tags(f) for f in dirs["reward_finetune"].glob("events.out.tfevents.*"))
    )
    assert mk.REWARD_NET_SCORE in finetuned


def test_fine_tuned_heads_are_exported_and_reported(smoke_run: SmokeRun) -> None:
    root = smoke_run.root
    history = json.loads((root / "finetune/reward_finetune/history.json").read_text())
    assert [p["step"] for p in history["points"]] == [0, 2, 4]
    assert history["method"] == "reward_gradient" and history["train_images"] == 8
    provenance = json.loads((root / "finetune/reward_finetune/model/provenance.json").read_text())
    assert provenance["reward_net"] == str(RunPaths(root).reward_net)
    assert provenance["selected_step"] == history["selected_step"]
    report = (root / "report.md").read_text()
    assert "## Fine-tuning the mask head (reward net vs labels)" in report
    assert "### Reward hacking: reward-net score vs ground-truth Dice along training" in report


def test_tune_can_restore_and_result_grid_loads(smoke_run: SmokeRun) -> None:
    tune_dir = RunPaths(smoke_run.root).tune_dir
    assert tune.Tuner.can_restore(str(tune_dir))
    analysis = tune.ExperimentAnalysis(str(tune_dir))
    frame = analysis.dataframe()
    by_trial = {row["config/trial"]: row for _, row in frame.iterrows()}
    assert set(by_trial) == TRIALS
    for trial in PPO_TRIALS:
        assert 0.0 <= by_trial[trial][mk.EVAL_DICE] <= 1.0
        assert by_trial[trial][mk.ENV_STEPS] >= 64


def test_existing_output_is_refused_without_resume(smoke_run: SmokeRun, capsys) -> None:
    code = main(smoke_args(smoke_run.root, smoke_run.cache_dir))
    assert code == 2
    assert "already holds files; pass --resume" in capsys.readouterr().err


def test_bad_config_fails_before_ray_starts(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  lr: -1\n  mystery: 3\n")
    code = main(["run", "--config", str(bad), "--output", str(tmp_path / "out"), "--no-dashboard"])
    err = capsys.readouterr().err
    assert code == 2
    assert "key 'ppo.lr'" in err and "unknown key 'ppo.mystery'" in err
    assert not (tmp_path / "out").exists()


def _wait_for_checkpoint(root: Path, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if list((root / "tune").glob("*/checkpoint_000000")):
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended (code {process.returncode}) before its first checkpoint")
        time.sleep(0.5)
    pytest.fail("no checkpoint within the time limit")


@pytest.mark.slow
def test_killed_driver_resumes(tmp_path: Path) -> None:
    root, cache = tmp_path / "run", tmp_path / "cache"
    command = [sys.executable, "-m", "orchestrator", *smoke_args(root, cache, *CHAIN)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_checkpoint(root, process, timeout_s=300)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started
        process.wait()
    assert not (root / "summary.json").exists()
    forward_before = sum(1 for _ in cache.rglob("*.entry"))

    # Fewer CPUs now: one CPU worker instead of two. The restored trials find the resume's
    # workers by the run id (their configs name no worker).
    code = main(["run", "--output", str(root), "--resume", "--num-cpus", "1", "--no-dashboard"])
    assert code == 0
    summary = json.loads((root / "summary.json").read_text())
    assert summary["trials"] == {t: "TERMINATED" for t in CHAIN_TRIALS}
    assert summary["inference"]["workers"] == 1
    # The warm-up finished before the kill: every pair is served from the disk cache.
    assert summary["inference"]["forward_passes"] == 0
    assert sum(1 for _ in cache.rglob("*.entry")) == forward_before


def test_resume_refuses_flags_that_contradict_the_run(tmp_path: Path, capsys) -> None:
    from orchestrator.config import CONFIG_DIR, config_to_dict, load_config
    from orchestrator.pipeline import RunOptions, resolve_config

    root = tmp_path / "run"
    saved = load_config(CONFIG_DIR / "smoke.yaml", {"workers": {"cache_dir": str(tmp_path / "c")}})
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump(config_to_dict(saved), sort_keys=False))
    resume = ["--output", str(root), "--resume", "--no-dashboard"]
    assert main(["train", "--experiment", "prompt", *resume, "--data", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "--resume: the flags given contradict the config this run started with" in err
    assert f"data.path: this run has None, asked '{tmp_path / 'd'}'" in err
    assert (
        "experiments: this run has ['prompt', 'postprocess', 'reward', 'finetune'], "
        "asked ['prompt']"
    ) in err
    assert main(["run", *resume, "--config", str(CONFIG_DIR / "quick.yaml")]) == 2
    assert "mode: this run has 'smoke', asked 'quick'" in capsys.readouterr().err
    # Where it runs may change, and one folder spelled another way is the same folder.
    same = RunOptions(output=str(root), resume=True, num_cpus=1, cache_dir=f"{tmp_path}/x/../c")
    assert resolve_config(same, RunPaths(root)) == saved
    (root / "tune").mkdir()  # Tune state of a version whose trials named their workers
    assert main(["run", *resume]) == 2
    assert "(it has no run_id file); this version cannot resume" in capsys.readouterr().err


@pytest.mark.slow
def test_skip_bad_run_after_a_failed_attempt_into_the_same_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad entry stops stage 2 with the run's own words; the corrected re-run into the same
    --output (data.skip_bad: true) starts over there and completes: every later stage loads the
    data with skip_bad too."""
    from envs.synthetic import write_dataset

    data = write_dataset(tmp_path / "data", n=24, seed=3, frames_per_video=4, progress=False)
    bad = sorted((data / "images").iterdir())[5]
    bad.write_bytes(b"not an image")
    strict, lenient = tmp_path / "strict.yaml", tmp_path / "lenient.yaml"
    smoke = Path(__file__).parent.parent / "tune_configs" / "smoke.yaml"
    strict.write_text(f"extends: {smoke}\ndata:\n  path: {data}\n")
    lenient.write_text(f"extends: {strict}\ndata:\n  skip_bad: true\n")
    root, cache = tmp_path / "run", tmp_path / "cache"

    def run_with(config: Path) -> int:
        args = smoke_args(root, cache, *CHAIN)
        args[args.index("--config") + 1] = str(config)
        return main(args)

    assert run_with(strict) == 2
    err = capsys.readouterr().err
    assert f"cannot decode image {bad}" in err
    assert "data.skip_bad: true in the --config file" in err and "--skip-bad" not in err
    assert run_with(lenient) == 0
    out = capsys.readouterr().out
    assert "an earlier attempt stopped before Tune started; starting over" in out
    assert f"skipped entry 5 ('{bad.name}'): cannot decode image" in out
    summary = json.loads((root / "summary.json").read_text())
    assert sum(summary["splits"].values()) == 23
    assert summary["trials"] == {t: "TERMINATED" for t in CHAIN_TRIALS}
