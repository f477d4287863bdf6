"""Experiment 4 (``finetune``) on the Sa2VA backend, end to end with the tiny v2 fixture on the
CPU: ``sa2va-rl train --experiment finetune --local`` trains the reward net, then fine-tunes
Sa2VA's head (``text_hidden_fcs`` + SAM2's mask decoder) against it and against the labels,
with the frozen inputs computed by the segmentation worker that holds the model; each trial
exports a model folder that upstream's code loads, whose masks are the run's evaluation of the
kept head.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny_sa2va import write_tiny_sa2va

from envs.sources import load_split
from models.heads import HeadSegmenter
from models.sa2va import Sa2VASegmenter
from orchestrator.cli import main
from orchestrator.config import CONFIG_DIR
from orchestrator.data import prepare_data
from orchestrator.evaluation.stage import head_segmenters
from orchestrator.inference.backend_spec import BackendSpec
from orchestrator.inference.client import SegmentationClient
from orchestrator.inference.worker import SegmentationWorker
from orchestrator.run_dir import RunPaths
from orchestrator.training.finetune import head_state_file, model_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TRIALS = ("reward_finetune", "supervised_finetune")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """(run root, model folder, exit code) of one local finetune run on the tiny model."""
    base = tmp_path_factory.mktemp("sa2va_finetune")
    model = write_tiny_sa2va(base / "tiny_sa2va_v2", sam_size=256)
    config = base / "smoke-sa2va.yaml"
    settings = {
        "extends": str(CONFIG_DIR / "smoke.yaml"),
        "backend": {"name": "sa2va", "model_path": str(model), "device": "cpu"},
        # A bigger step than Frangi's default, so 4 steps visibly move the tiny decoder.
        "finetune": {"lr": 0.05},
    }
    config.write_text(yaml.safe_dump(settings))
    root = base / "run"
    code = main(
        [
            *("train", "--experiment", "finetune", "--local", "--config", str(config)),
            *("--output", str(root), "--cache-dir", str(base / "cache")),
        ]
    )
    return root, model, code


def test_both_heads_train_and_export_a_model_folder(finetuned: tuple[Path, Path, int]) -> None:
    root, model, code = finetuned
    assert code == 0
    paths = RunPaths(root)
    for name in TRIALS:
        history = json.loads((paths.root / "finetune" / name / "history.json").read_text())
        assert history["train_images"] == 8 and history["train_images_without_seg"] == 0
        assert history["points"][0]["step"] == 0 and history["points"][-1]["step"] == 4
        exported = model_dir(paths, name)
        for file in ("config.json", "modeling_sa2va_chat.py", "sam2.py"):
            assert (exported / file).read_bytes() == (model / file).read_bytes()
        provenance = json.loads((exported / "provenance.json").read_text())
        assert provenance["training"]["trial"] == name
        assert provenance["training"]["train_images"] == 8
        assert provenance["base"]["backend_id"].startswith("sa2va:")
    reward = json.loads((model_dir(paths, "reward_finetune") / "provenance.json").read_text())
    assert reward["training"]["reward_net"] == str(paths.reward_net)
    assert len(reward["training"]["reward_net_sha256"]) == 64


def test_the_exported_model_gives_the_runs_evaluation_of_the_head(
    finetuned: tuple[Path, Path, int],
) -> None:
    root, model, code = finetuned
    assert code == 0
    paths = RunPaths(root)
    config_file = yaml.safe_load(paths.config.read_text())
    from orchestrator.config import parse_config

    config = parse_config(config_file, source=str(paths.config))
    prepared = prepare_data(config, paths)
    spec = BackendSpec("sa2va", {"model_path": str(model), "device": "cpu"})
    client = SegmentationClient.in_process([SegmentationWorker("w0", spec)])
    states = {name: head_state_file(paths, name) for name in TRIALS}
    heads = head_segmenters(client, states)
    prompt = config.env.default_prompt
    images = [s.image for s in load_split(prepared.ref, "test", 3)]
    moved = 0
    for name in TRIALS:
        evaluated = heads[name]
        assert isinstance(evaluated, HeadSegmenter)
        assert evaluated.backend_id.startswith(client.backend_id + "+head:")
        exported = Sa2VASegmenter(model_dir(paths, name), device="cpu")
        for image in images:
            mask = exported.segment(image, prompt).mask
            np.testing.assert_array_equal(mask, evaluated.segment(image, prompt).mask)
            moved += int(np.count_nonzero(mask != client.segment(image, prompt).mask))
    assert moved > 0  # the heads changed some masks: the test can tell a head from the base
    # The kept state is the head the trial exported (float32 here: the fixture's dtype).
    state = torch.load(head_state_file(paths, "reward_finetune"), weights_only=True)
    assert any(key.startswith("sam_mask_decoder.") for key in state)
