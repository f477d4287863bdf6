"""The Frangi mask head (models/frangi_head.py), its fine-tuning (models/head_training.py) and
the fine-tuning trials' dependency on the reward net (orchestrator/training/finetune.py)."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from envs.sample import Sample
from envs.sources import DataRef
from envs.synthetic import generate_samples
from models.backends import make_segmenter
from models.errors import UserError
from models.frangi import PRESETS, FrangiSegmenter, preset_name_for
from models.frangi_head import (
    EPS,
    FrangiHeadBackend,
    FrangiHeadSegmenter,
    head_segmentation,
    load_head_segmenter,
)
from models.head_training import (
    HeadExample,
    LabelLoss,
    RewardGradient,
    RewardPolicyGradient,
    TrainSettings,
    evaluate_head,
    train_head,
)
from models.prompts import CANDIDATE_PROMPTS
from models.reward_net import RewardNet, image_channel
from models.segmentation import Segmentation
from orchestrator.config import CONFIG_DIR, load_config
from orchestrator.experiments import TrialSpec, trial, trials_for, trials_of_experiment
from orchestrator.inference.backend_spec import BackendSpec
from orchestrator.inference.client import SegmentationClient
from orchestrator.inference.worker import SegmentationWorker
from orchestrator.run_id import new_run_id
from orchestrator.training import trial_status as status
from orchestrator.training.finetune import head_examples, run_finetune
from orchestrator.training.local import LocalSink


def frangi_client() -> SegmentationClient:
    """The run's client over one in-process Frangi worker (memory cache only)."""
    return SegmentationClient.in_process([SegmentationWorker("w0", BackendSpec("frangi"))])


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return generate_samples(1, seed=3)[0].image


def test_the_head_at_initialisation_is_the_baseline_soft_mask(image: np.ndarray) -> None:
    segmenter = FrangiSegmenter()
    backend = FrangiHeadBackend(segmenter)
    head = backend.initial_head()
    inputs = backend.frozen_inputs(image, CANDIDATE_PROMPTS)
    for prompt, one in zip(CANDIDATE_PROMPTS, inputs, strict=True):
        base = segmenter.segment(image, prompt)
        with torch.no_grad():
            prob = torch.sigmoid(head(one)).numpy()
        assert prob.shape == base.mask.shape and prob.dtype == np.float32
        # Exact up to the logit's clipping at EPS (where Frangi says 0) and float32 rounding.
        assert np.abs(prob - base.prob).max() <= EPS * 1.01
        mine = head_segmentation(prob, one)
        if not PRESETS[preset_name_for(prompt)].suppress_catheter:
            assert np.array_equal(mine.mask, base.mask), prompt


def _perturbed(backend: FrangiHeadBackend) -> torch.nn.Module:
    head = backend.initial_head()
    with torch.no_grad():
        head.shift.bias.fill_(1.5)  # every pixel's logit + 1.5: a more permissive mask
    return head


def test_an_exported_head_is_a_backend_of_its_own(tmp_path: Path, image: np.ndarray) -> None:
    backend = FrangiHeadBackend()
    head = _perturbed(backend)
    folder = backend.export(head, tmp_path / "model", {"steps": 3})
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance == {"steps": 3, "base_backend_id": backend.backend_id}
    loaded = make_segmenter("frangi", head_path=str(folder))
    assert isinstance(loaded, FrangiHeadSegmenter)
    assert loaded.backend_id.startswith("frangi-head:")
    assert loaded.backend_id == FrangiHeadSegmenter(head).backend_id
    assert loaded.backend_id != FrangiHeadSegmenter(backend.initial_head()).backend_id
    prompt = CANDIDATE_PROMPTS[0]
    mine, base = loaded.segment(image, prompt), FrangiSegmenter().segment(image, prompt)
    assert mine.prob is not None and base.prob is not None
    clipped = base.prob.clip(EPS, 1 - EPS)
    expected = 1 / (1 + np.exp(-(np.log(clipped) - np.log1p(-clipped) + 1.5)))
    assert np.abs(mine.prob - expected).max() < 1e-5
    assert mine.mask.sum() > base.mask.sum()
    (folder / "head.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"head\.pt: not the weights of this head"):
        load_head_segmenter(folder)
    with pytest.raises(UserError, match="is not an exported Frangi head"):
        load_head_segmenter(tmp_path)


class _Ramp:
    """A 'Frangi' base on 32x32 images: prob rises with darkness (fast, deterministic)."""

    backend_id = "frangi:ramp"

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        prob = np.clip((160 - image[:, :, 0].astype(np.float32)) / 120, 0, 1)
        return Segmentation(mask=prob > 0.5, prob=prob)


def _unlabelled(n: int) -> list[Sample]:
    rng = np.random.default_rng(1)
    images = [rng.integers(30, 230, (32, 32, 1), dtype=np.uint8).repeat(3, 2) for _ in range(n)]
    return [Sample(f"u{i}.png", f"g{i}", image, None) for i, image in enumerate(images)]


@pytest.mark.parametrize("objective", ["gradient", "policy_gradient"])
def test_reward_finetuning_trains_on_images_without_labels(objective: str) -> None:
    torch.manual_seed(0)
    net = RewardNet(width=4).eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    backend = FrangiHeadBackend(_Ramp())
    samples = _unlabelled(4)
    examples = head_examples(backend, samples, "segment the vessel", 16, labels=False)
    assert all(e.truth is None for e in examples)
    loss = (
        RewardGradient(net, kl_weight=0.1)
        if objective == "gradient"
        else RewardPolicyGradient(net, kl_weight=0.1, samples=3)
    )
    head = backend.initial_head()
    before = {k: v.clone() for k, v in head.state_dict().items()}

    def evaluate(step: int):  # type: ignore[no-untyped-def]
        return evaluate_head(head, examples, backend.segmentation, net, 0.0, step)

    result = train_head(
        head,
        examples,
        loss,
        TrainSettings(steps=3, batch_images=2, lr=0.05, eval_every=1),
        evaluate,
        lambda point: point.reward_net_score,
    )
    assert [p.step for p in result.history] == [0, 1, 2, 3]
    assert all(math.isnan(p.gt_dice) and math.isnan(p.reward_net_mae) for p in result.history)
    assert not torch.equal(head.state_dict()["residual.weight"], before["residual.weight"])
    kept = max(result.history, key=lambda p: p.reward_net_score)
    assert result.selected_step == kept.step


def test_the_supervised_head_refuses_an_unlabelled_image() -> None:
    backend = FrangiHeadBackend(_Ramp())
    examples = head_examples(backend, _unlabelled(2), "segment the vessel", 16, labels=True)
    head = backend.initial_head()
    point = evaluate_head(head, examples, backend.segmentation, None, 0.0, 0)
    with pytest.raises(ValueError, match="has no label"):
        train_head(
            head, examples, LabelLoss(), TrainSettings(1, 2, 0.01, 1), lambda s: point, lambda p: 0
        )


def test_the_finetune_experiment_brings_the_reward_net_trial() -> None:
    assert [t.name for t in trials_of_experiment("finetune")] == [
        "reward_net",
        "reward_finetune",
        "supervised_finetune",
    ]
    config = load_config(CONFIG_DIR / "smoke.yaml", {"experiments": ["prompt", "finetune"]})
    assert [t.name for t in trials_for(config)] == [
        "prompt",
        "reward_net",
        "reward_finetune",
        "supervised_finetune",
    ]
    sa2va = load_config(CONFIG_DIR / "smoke.yaml", {"backend": {"name": "sa2va"}})
    assert "finetune" in sa2va.experiments  # a Sa2VA checkpoint has a head to fine-tune
    exported = load_config(CONFIG_DIR / "smoke.yaml", {"backend": {"model_path": "/x"}})
    assert "finetune" not in exported.experiments  # an exported Frangi head: left out
    with pytest.raises(UserError, match="with model_path '/x' \\(an exported Frangi head\\)"):
        load_config(
            CONFIG_DIR / "smoke.yaml",
            {"experiments": ["finetune"], "backend": {"model_path": "/x"}},
        )


def test_reward_finetuning_waits_for_the_reward_net_and_fails_with_it(tmp_path: Path) -> None:
    run_id = new_run_id()
    board = status.host_locally(run_id, str(tmp_path))
    run = load_config(CONFIG_DIR / "smoke.yaml")
    spec = TrialSpec(
        trial("reward_finetune"), run, str(tmp_path), run_id, "frangi", DataRef(str(tmp_path))
    )
    awaited = TrialSpec(trial("reward_net"), run, str(tmp_path), run_id, "frangi", spec.data)
    outcome: dict[str, object] = {}

    def finetune() -> None:
        try:
            run_finetune(spec, frangi_client(), LocalSink(tmp_path / "ft"))
        except UserError as err:
            outcome["error"] = str(err)

    with pytest.raises(RuntimeError, match="boom"), status.reporting(awaited):
        waiter = threading.Thread(target=finetune)
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive(), "reward_finetune did not wait for the reward net"
        raise RuntimeError("boom")
    board.fail("reward_net", "Tune: its process ended")  # the driver's word when Tune gives up
    waiter.join(timeout=30)
    assert not waiter.is_alive(), "reward_finetune did not stop on FAILED"
    assert outcome["error"] == (
        "the reward_net trial failed (RuntimeError: boom), so the reward_finetune trial cannot "
        "go on; see tune/reward_net_*/error.txt in the run directory"
    )


def test_head_examples_drop_labels_unless_asked(image: np.ndarray) -> None:
    truth = np.zeros(image.shape[:2], bool)
    sample = Sample("a.png", "g", image, truth)
    backend = FrangiHeadBackend(FrangiSegmenter())
    (unlabelled,) = head_examples(backend, [sample], CANDIDATE_PROMPTS[0], 64, labels=False)
    (labelled,) = head_examples(backend, [sample], CANDIDATE_PROMPTS[0], 64, labels=True)
    assert unlabelled.truth is None and labelled.truth is truth
    assert np.array_equal(unlabelled.image_x, image_channel(image, 64))
    assert isinstance(unlabelled, HeadExample)


def test_run_selects_experiments_with_the_experiment_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import cli, pipeline

    seen: list[object] = []
    monkeypatch.setattr(pipeline, "run", lambda options: seen.append(options.experiments) or 0)
    argv = ["run", "--experiment", "finetune", "--experiment", "prompt", "--output", "/nowhere"]
    assert cli.main(argv) == 0
    assert seen == [("finetune", "prompt")]


def test_reward_examples_include_perturbed_soft_masks_scored_by_their_hard_mask() -> None:
    from envs.mask_ops import MaskOpsConfig
    from envs.reward_data import build_examples, candidate_masks
    from models.metrics import mask_metrics
    from models.reward_net import mask_channel
    from tests.test_reward_net import PROMPTS, _samples, _ThresholdSegmenter

    samples, segmenter = _samples(2), _ThresholdSegmenter()
    per_image = len(PROMPTS) + 3
    examples = build_examples(
        samples, segmenter, PROMPTS, per_image=per_image, input_size=16, seed=2, soft=2
    )
    rng = np.random.default_rng(2)  # the same draws, replayed
    for i, sample in enumerate(samples):
        assert sample.mask is not None
        masks = candidate_masks(sample, segmenter, PROMPTS, rng, MaskOpsConfig(), per_image, soft=2)
        kinds = [m.dtype for m in masks]
        assert kinds == [np.bool_] * (per_image - 2) + [np.float32] * 2
        own = examples[per_image * (i + 1) - 2 : per_image * (i + 1)]
        for example, mask in zip(own, masks[-2:], strict=True):
            m = mask_metrics(mask > 0.5, sample.mask)
            assert (
                example.y.tolist() == np.array([m.dice, m.recall, m.precision], np.float32).tolist()
            )
            assert np.array_equal(example.mask_x, mask_channel(mask, 16))
            assert ((mask > 0.05) & (mask < 0.95)).any()  # soft, not a thresholded mask


def test_the_hacking_panel_says_so_when_score_and_dice_move_apart() -> None:
    from orchestrator.report.finetune import _hacking_verdict

    def point(step: int, score: float, dice: float) -> dict[str, float]:
        return {"step": step, "reward_net_score": score, "gt_dice": dice, "reward_net_mae": 0.1}

    hacked = [point(0, 0.726, 0.696), point(10, 0.725, 0.674), point(40, 0.728, 0.688)]
    assert _hacking_verdict(hacked).startswith(
        "**The head learned to please the reward net (reward hacking)**: at step 40 the "
        "reward-net score rose (0.726 -> 0.728) while the val GT Dice fell (0.696 -> 0.688)."
    )
    honest = [point(0, 0.7, 0.7), point(10, 0.72, 0.71), point(20, 0.69, 0.68)]
    assert _hacking_verdict(honest).startswith("No divergence")


def test_the_workers_compute_frozen_inputs_from_their_cache(image: np.ndarray) -> None:
    from models.frangi_head import FrangiHead
    from orchestrator.inference.heads import WorkerHeadBackend

    worker = SegmentationWorker("w0", BackendSpec("frangi"))
    backend = WorkerHeadBackend(SegmentationClient.in_process([worker]))
    prompt = CANDIDATE_PROMPTS[0]
    (served,) = backend.frozen_inputs(image, [prompt])
    (direct,) = FrangiHeadBackend().frozen_inputs(image, [prompt])
    assert served.size == direct.size and dict(served.meta) == dict(direct.meta)
    for name in ("grey", "suppressed"):
        assert torch.equal(served.tensors[name], direct.tensors[name]), name
    # The soft mask is the cache's: quantised to 8 bits (half a step at most from Frangi's own).
    cached = worker.segment(image, prompt).prob
    assert np.array_equal(served.tensors["prob"].numpy(), cached)
    gap = (served.tensors["prob"] - direct.tensors["prob"]).abs().max()
    assert 0 < float(gap) <= 0.5 / 255 + 1e-7
    (again,) = backend.frozen_inputs(image, [prompt])
    assert worker.stats()["forward_passes"] == 1  # the second image's soft mask: from the cache
    assert torch.equal(again.tensors["grey"], served.tensors["grey"])
    assert isinstance(backend.initial_head(), FrangiHead)
