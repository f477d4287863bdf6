"""The reward network: exact metrics, learning a known target, checkpoints, examples, the CLI.

Everything runs on tiny inputs (32 px, a few dozen examples, a handful of images), so the file
takes seconds. The figures on the real default data come from ``sa2va-rl train-reward-net``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from envs.mask_ops import MaskOpsConfig
from envs.reward_data import build_examples, candidate_masks
from envs.sample import Sample
from envs.split import read_manifest
from envs.synthetic import write_dataset
from models.errors import UserError
from models.frangi import FrangiSegmenter
from models.metrics import mask_metrics
from models.prompts import DEFAULT_PROMPT
from models.reward_net import (
    CHECKPOINT_VERSION,
    TARGETS,
    RewardExample,
    RewardNet,
    RewardScorer,
    evaluate_predictions,
    image_channel,
    load_checkpoint,
    make_input,
    mask_channel,
    save_checkpoint,
    train_reward_net,
)
from models.segmentation import Segmentation
from orchestrator.cli import EXIT_USER_ERROR, main
from orchestrator.config import CONFIG_DIR

COMMAND = "sa2va-rl train-reward-net"


def _says(problem: str) -> str:
    """A pattern for a message naming ``problem`` and, later, the command that fixes it."""
    return f"{re.escape(problem)}.*{re.escape(COMMAND)}"


META = {"input_size": 32, "backend_id": "fake-v1", "manifest_hash": "abc123"}


# --- metrics -------------------------------------------------------------------------------------
def test_evaluate_predictions_on_hand_made_arrays() -> None:
    # dice: MAE (.1+.1+0+.2)/4; ranks (1,2,3,4) vs (2,1,3,4): rho = 1 - 6*2/(4*15) = 0.8;
    # Pearson = 0.07 / sqrt(0.05 * 0.14) = sqrt(0.7). recall: constant truth. precision: exact.
    dice_p, dice_t = [0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.3, 0.6]
    predicted = np.array([dice_p, [0.1, 0.9, 0.5, 0.3], [0.2, 0.4, 0.6, 0.8]]).T
    true = np.array([dice_t, [0.5] * 4, [0.2, 0.4, 0.6, 0.8]]).T
    reports = evaluate_predictions(predicted, true, np.array([0.5, 0.5, 0.3]), ["a", "a", "a", "b"])
    dice = reports["dice"]
    assert dice.mae == pytest.approx(0.1)
    assert dice.spearman == pytest.approx(0.8)
    assert dice.pearson == pytest.approx(math.sqrt(0.7))
    assert dice.mean_predictor_mae == pytest.approx((0.3 + 0.4 + 0.2 + 0.1) / 4)
    # image a: ranks (1,2,3) vs (2,1,3): rho = 1 - 6*2/(3*8) = 0.5; image b has one mask: skipped
    assert dice.within_image_spearman == pytest.approx(0.5)
    assert dice.mean_predictor_spearman == 0.0
    recall = reports["recall"]
    assert recall.mae == pytest.approx((0.4 + 0.4 + 0.0 + 0.2) / 4)
    assert (recall.pearson, recall.spearman, recall.within_image_spearman) == (0.0, 0.0, 0.0)
    assert recall.mean_predictor_mae == 0.0
    precision = reports["precision"]
    assert precision.mae == pytest.approx(0.0)
    assert precision.pearson == pytest.approx(1.0) and precision.spearman == pytest.approx(1.0)
    assert precision.mean_predictor_mae == pytest.approx((0.1 + 0.1 + 0.3 + 0.5) / 4)
    assert list(reports) == list(TARGETS)


def test_without_image_ids_within_image_spearman_is_zero() -> None:
    values = np.linspace(0, 1, 5)[:, None].repeat(3, axis=1)
    assert evaluate_predictions(values, values, values.mean(0))["dice"].within_image_spearman == 0


# --- training ------------------------------------------------------------------------------------
def _area_examples(n: int, seed: int) -> list[RewardExample]:
    """Random rectangles on noise; every target is the mask's area fraction (learnable)."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), bool)
        h, w = rng.integers(4, 29, 2)
        top, left = rng.integers(0, 32 - h + 1), rng.integers(0, 32 - w + 1)
        mask[top : top + h, left : left + w] = True
        y = np.full(3, mask.mean(), np.float32)
        examples.append(
            RewardExample(f"img{i}", image_channel(image, 32), mask_channel(mask, 32), y)
        )
    return examples


def test_training_learns_a_learnable_target_and_beats_the_mean_predictor() -> None:
    val_maes: list[float] = []
    _, report = train_reward_net(
        _area_examples(192, seed=0),
        _area_examples(64, seed=1),
        epochs=10,
        batch_size=16,
        lr=5e-3,
        on_epoch=lambda epoch, mae: val_maes.append(mae),
    )
    assert len(val_maes) == 10
    assert min(val_maes) < 0.5 * val_maes[0]
    # the epoch kept is the one with the lowest validation MAE (mean over the three targets)
    kept = np.mean([t.mae for t in report.targets.values()])
    assert kept == pytest.approx(min(val_maes), abs=1e-6)
    dice = report.targets["dice"]
    assert report.best_epoch == 1 + val_maes.index(min(val_maes))
    assert dice.mae < 0.5 * dice.mean_predictor_mae
    assert dice.spearman > 0.9
    assert report.beats_mean_predictor("dice")
    assert (report.n_train, report.n_val, report.n_val_images) == (192, 64, 64)


def test_training_needs_examples_on_both_sides() -> None:
    with pytest.raises(UserError, match="training and validation examples, got 4 and 0"):
        train_reward_net(_area_examples(4, seed=0), [])


# --- checkpoints ---------------------------------------------------------------------------------
def _trained(tmp_path: Path) -> tuple[RewardNet, Path]:
    model, _ = train_reward_net(_area_examples(16, 0), _area_examples(4, 1), epochs=1)
    return model, save_checkpoint(tmp_path / "net.pt", model, META)


def test_save_load_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    model, path = _trained(tmp_path)
    payload = torch.load(path, weights_only=True)
    assert payload["metadata"] == {
        **META,
        "version": CHECKPOINT_VERSION,
        "targets": list(TARGETS),
        "width": model.width,
    }
    loaded = load_checkpoint(path, backend_id="fake-v1", manifest_hash="abc123")
    original = RewardScorer(model, META)
    rng = np.random.default_rng(3)
    for _ in range(3):
        image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        mask = rng.random((40, 48)) > 0.7
        assert loaded.score(image, mask) == original.score(image, mask)
    x = torch.from_numpy(np.stack([make_input(image, mask, 32)] * 2))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model.eval()(x))


def test_loading_a_checkpoint_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    # A PPO trial loads the run's reward net after RLlib seeded torch: building the network
    # must not draw from the global generator, or the trial would sample other actions.
    _, path = _trained(tmp_path)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_checkpoint(path)
    assert torch.equal(torch.rand(3), expected)


def test_missing_checkpoint_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=_says(f"not found: {tmp_path / 'none.pt'}")):
        load_checkpoint(tmp_path / "none.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken"])
def test_corrupt_checkpoint_names_the_problem_and_the_command(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=_says(f"{path} is corrupt or not a torch file")):
        load_checkpoint(path)


def test_truncated_checkpoint_is_corrupt(tmp_path: Path) -> None:
    _, path = _trained(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match=_says("corrupt or not a torch file")):
        load_checkpoint(path)


def test_foreign_torch_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match=_says("not a sa2va-rl reward net")):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("key", "kwargs", "found", "expected"),
    [
        ("backend_id", {"backend_id": "frangi:other"}, "'fake-v1'", "'frangi:other'"),
        ("manifest_hash", {"manifest_hash": "def456"}, "'abc123'", "'def456'"),
    ],
)
def test_mismatched_checkpoint_names_key_values_and_command(
    tmp_path: Path, key: str, kwargs: dict[str, str], found: str, expected: str
) -> None:
    _, path = _trained(tmp_path)
    pattern = _says(f"made for {key}={found}, but this run uses {key}={expected}")
    with pytest.raises(UserError, match=pattern):
        load_checkpoint(path, **kwargs)


def test_old_version_is_refused_with_the_command(tmp_path: Path) -> None:
    path = tmp_path / "v1.pt"
    torch.save({"state_dict": {}, "metadata": {"version": 1, "input_size": 64}}, path)
    pattern = _says(f"made for version=1, but this run uses version={CHECKPOINT_VERSION}")
    with pytest.raises(UserError, match=pattern):
        load_checkpoint(path)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "w.pt", RewardNet(width=8), META)
    payload = torch.load(path, weights_only=True)
    payload["metadata"]["width"] = 16
    torch.save(payload, path)
    with pytest.raises(UserError, match=_says("do not fit the network")):
        load_checkpoint(path)


class _RunsCode:
    """Unpickling this creates a file: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_pickle_bearing_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    metadata = {**META, "version": CHECKPOINT_VERSION, "payload": _RunsCode(marker)}
    torch.save({"state_dict": RewardNet().state_dict(), "metadata": metadata}, path)
    with pytest.raises(UserError, match=_says(f"{path} holds pickled Python objects")):
        load_checkpoint(path)
    assert not marker.exists()


# --- examples ------------------------------------------------------------------------------------
PROMPTS = ("dark", "darker", "darkest")
LEVELS = {"dark": 150, "darker": 110, "darkest": 70}


class _ThresholdSegmenter:
    """A prompt-specific darkness threshold, with a soft mask; counts calls."""

    backend_id = "threshold-v1"

    def __init__(self) -> None:
        self.calls = 0

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        self.calls += 1
        level = LEVELS[prompt]
        prob = np.clip((level + 40 - image[:, :, 0].astype(np.float32)) / 80, 0, 1)
        return Segmentation(mask=prob > 0.5, prob=prob.astype(np.float32))


def _samples(n: int) -> list[Sample]:
    rng = np.random.default_rng(7)
    samples = []
    for i in range(n):
        grey = rng.integers(40, 220, (32, 32), dtype=np.uint8)
        gt = grey < 120
        image = np.repeat(grey[:, :, None], 3, axis=2)
        samples.append(Sample(f"s{i}.png", f"g{i}", image, gt))
    return samples


def test_build_examples_pairs_every_mask_with_its_exact_metrics() -> None:
    samples, segmenter = _samples(3), _ThresholdSegmenter()
    examples = build_examples(samples, segmenter, PROMPTS, per_image=6, input_size=16, seed=5)
    assert len(examples) == 6 * len(samples)
    assert segmenter.calls == len(PROMPTS) * len(samples)  # every image segmented once per prompt
    rng = np.random.default_rng(5)  # the same draws, replayed
    for i, sample in enumerate(samples):
        assert sample.mask is not None
        own = examples[6 * i : 6 * (i + 1)]
        masks = candidate_masks(sample, segmenter, PROMPTS, rng, MaskOpsConfig(), per_image=6)
        prompt_masks = [segmenter.segment(sample.image, p).mask for p in PROMPTS]
        for j in range(len(PROMPTS)):  # the prompt masks come first, in prompt order
            assert np.array_equal(masks[j], prompt_masks[j])
        for example, mask in zip(own, masks, strict=True):
            assert example.image_id == sample.id
            assert example.image_x is own[0].image_x  # one image channel per image
            assert np.array_equal(example.image_x, image_channel(sample.image, 16))
            assert np.array_equal(example.mask_x, mask_channel(mask, 16))
            m = mask_metrics(mask, sample.mask)
            expected = np.array([m.dice, m.recall, m.precision], dtype=np.float32)
            assert example.y.tolist() == expected.tolist()
            assert example.x.shape == (2, 16, 16)


def test_fewer_masks_than_prompts_is_a_subset_of_prompt_masks() -> None:
    sample, segmenter = _samples(1)[0], _ThresholdSegmenter()
    examples = build_examples([sample], segmenter, PROMPTS, per_image=2, input_size=16)
    prompt_masks = [mask_channel(segmenter.segment(sample.image, p).mask, 16) for p in PROMPTS]
    matched = {
        next(j for j, m in enumerate(prompt_masks) if np.array_equal(e.mask_x, m)) for e in examples
    }
    assert len(examples) == 2 and len(matched) == 2


def test_build_examples_refuses_an_unlabelled_image_before_segmenting_it() -> None:
    segmenter = _ThresholdSegmenter()
    unlabelled = Sample("unlabelled.png", "g9", _samples(1)[0].image, None)
    with pytest.raises(UserError, match=re.escape("image unlabelled.png has no ground-truth mask")):
        build_examples([*_samples(2), unlabelled], segmenter, PROMPTS, per_image=4, input_size=16)
    assert segmenter.calls == 2 * len(PROMPTS)  # the labelled images before it, not it


# --- the command ---------------------------------------------------------------------------------
def _tiny_config(tmp_path: Path, **data: Any) -> Path:
    """smoke.yaml with two prompts (fast Frangi) and the given data keys."""
    prompts = [DEFAULT_PROMPT, "segment only the large vessels"]
    lines = [f"extends: {CONFIG_DIR / 'smoke.yaml'}", "env:", f"  prompts: {json.dumps(prompts)}"]
    if data:
        lines += ["data:", *(f"  {k}: {v}" for k, v in data.items())]
    path = tmp_path / "tiny.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


FAST = ["--epochs", "1", "--samples-per-image", "3", "--input-size", "32", "--batch-size", "4"]


def test_cli_on_the_built_in_data_writes_checkpoint_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    config = _tiny_config(tmp_path, synthetic_n=24)
    assert main(["train-reward-net", "--config", str(config), "--output", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "epoch   1/1  val MAE" in printed and "within-image Spearman" in printed
    report = json.loads((out / "report.json").read_text())
    manifest = read_manifest(out / "split_manifest.json")
    assert (out / "data" / "annotations.json").is_file()  # generated like the run does
    assert report["n_train"] == 3 * len(manifest.split.train)
    assert report["n_val"] == 3 * len(manifest.split.val)
    assert set(report["targets"]) == set(TARGETS)
    backend_id = FrangiSegmenter().backend_id
    assert report["metadata"] == {
        "input_size": 32,
        "backend_id": backend_id,
        "manifest_hash": manifest.manifest_hash,
    }
    payload = torch.load(out / "best_reward_net.pt", weights_only=True)
    assert payload["metadata"]["input_size"] == 32
    scorer = load_checkpoint(
        out / "best_reward_net.pt", backend_id=backend_id, manifest_hash=manifest.manifest_hash
    )
    assert scorer.input_size == 32


def test_cli_with_data_and_a_manifest(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", n=8, frames_per_video=2, progress=False)
    config, first, second = _tiny_config(tmp_path), tmp_path / "a", tmp_path / "b"
    args = ["train-reward-net", "--config", str(config), *FAST]
    assert main([*args, "--data", str(data), "--output", str(first)]) == 0
    manifest = first / "split_manifest.json"
    # --manifest alone: the data is the manifest's dataset, the split and its hash are kept
    assert main([*args, "--manifest", str(manifest), "--output", str(second)]) == 0
    report = json.loads((second / "report.json").read_text())
    assert report["metadata"]["manifest_hash"] == read_manifest(manifest).manifest_hash
    assert report["data"] == str(data.resolve())
    assert not (second / "split_manifest.json").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data", "{tmp}/nowhere"], "does not exist"),
        (["--manifest", "{tmp}/none.json"], "split manifest {tmp}/none.json does not exist"),
        (["--epochs", "0"], "reward_net.epochs"),
        (["--batch-size", "1"], "reward_net.batch_size"),
        (["--config", "{tmp}/missing.yaml"], "config file {tmp}/missing.yaml not found"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    argv = [f.format(tmp=tmp_path) for f in flags]
    assert main(["train-reward-net", "--output", str(tmp_path / "out"), *argv]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "sa2va-rl train-reward-net: error:" in err and message.format(tmp=tmp_path) in err
