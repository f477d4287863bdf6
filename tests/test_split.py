"""Group-aware split, the split manifest, and the ``check-data`` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from envs.datasets import Dataset, load_dataset
from envs.split import (
    Split,
    check_manifest_matches,
    read_manifest,
    split_dataset,
    split_groups,
    write_manifest,
)
from models.errors import UserError
from orchestrator import cli

PATTERN = r"^(?P<group>.+)_frame_\d+$"


def make_dataset(root: Path, frames_per_group: list[int]) -> Path:
    """Folders dataset: group g has ``frames_per_group[g]`` tiny frames ``vid<g>_frame_<i>``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for g, frames in enumerate(frames_per_group):
        for i in range(frames):
            name = f"vid{g:02d}_frame_{i:03d}.png"
            pixels = np.full((4, 4), (g * 16 + i) % 256, np.uint8)
            assert cv2.imwrite(str(root / "images" / name), pixels)
            assert cv2.imwrite(str(root / "masks" / name), (pixels > 100).astype(np.uint8))
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Dataset:
    sizes = [3, 7, 5, 4, 6, 2, 8, 5, 3, 4, 6, 5, 7, 2, 3, 6, 4, 5, 3, 2]  # 20 groups, 90 images
    return load_dataset(make_dataset(tmp_path / "data", sizes))


def side_of_groups(dataset: Dataset, split: Split) -> dict[str, set[str]]:
    sides: dict[str, set[str]] = {}
    for name, ids in zip(split._fields, split, strict=True):
        for image_id in ids:
            sides.setdefault(dataset.group_of(image_id), set()).add(name)
    return sides


# ---------------------------------------------------------------------------------- split
def test_split_keeps_groups_together_and_covers_every_image(dataset: Dataset) -> None:
    split = split_dataset(dataset, (0.7, 0.15, 0.15), seed=0)
    assert sorted(split.train + split.val + split.test) == dataset.ids
    assert all(len(sides) == 1 for sides in side_of_groups(dataset, split).values())
    assert all(ids == sorted(ids) for ids in split)
    largest_group = 8
    for ids, fraction in zip(split, (0.7, 0.15, 0.15), strict=True):
        assert abs(len(ids) - fraction * len(dataset)) <= largest_group


def test_split_is_deterministic_and_depends_on_the_seed(dataset: Dataset) -> None:
    assert split_dataset(dataset, seed=3) == split_dataset(dataset, seed=3)
    assert split_dataset(dataset, seed=3) != split_dataset(dataset, seed=4)


def test_every_split_gets_a_group_with_three_groups(tmp_path: Path) -> None:
    small = load_dataset(make_dataset(tmp_path, [10, 1, 1]))
    for seed in range(6):
        split = split_dataset(small, (0.98, 0.01, 0.01), seed=seed)
        assert all(split), f"seed {seed}: {split}"


def test_fewer_groups_than_splits_is_a_user_error(tmp_path: Path) -> None:
    two = load_dataset(make_dataset(tmp_path, [2, 2]))
    with pytest.raises(UserError, match="2 group\\(s\\) but 3 splits need images"):
        split_dataset(two)
    split = split_dataset(two, (0.5, 0.5, 0.0))
    assert len(split.train) == len(split.val) == 2 and split.test == []


def test_split_groups_matches_split_dataset_whatever_the_group_order(dataset: Dataset) -> None:
    groups = dataset.groups()
    reversed_groups = dict(reversed(list(groups.items())))
    assert split_groups(reversed_groups, seed=9) == split_dataset(dataset, seed=9)


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.3, -0.1), (0.5, 0.2, 0.2)])
def test_bad_fractions(dataset: Dataset, fractions: tuple[float, ...]) -> None:
    with pytest.raises(UserError, match="fractions"):
        split_dataset(dataset, fractions)


def test_one_group_per_image_splits_by_image(tmp_path: Path) -> None:
    per_image = load_dataset(make_dataset(tmp_path, [20]), group_pattern=None)
    split = split_dataset(per_image, seed=0)
    assert [len(ids) for ids in split] == [14, 3, 3]


# ------------------------------------------------------------------------------- manifest
def test_manifest_round_trip(dataset: Dataset, tmp_path: Path) -> None:
    split = split_dataset(dataset, seed=5)
    path = tmp_path / "runs" / "split.json"
    written = write_manifest(path, dataset, split, 5, (0.7, 0.15, 0.15), PATTERN)
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temp file left
    manifest = read_manifest(path)
    assert manifest == written
    assert manifest.split == split and manifest.seed == 5 and manifest.group_pattern == PATTERN
    assert manifest.fractions == (0.7, 0.15, 0.15) and manifest.format == "folders"
    assert manifest.root == str(dataset.root)
    image_id = dataset.ids[0]
    assert manifest.groups[image_id] == dataset.group_of(image_id)
    assert manifest.image_sha256[image_id] == dataset.image_sha256(image_id)
    assert len(manifest.manifest_hash) == 64
    check_manifest_matches(manifest, dataset)


def test_manifest_hash_ignores_where_the_data_lives(dataset: Dataset, tmp_path: Path) -> None:
    moved = load_dataset(shutil.copytree(dataset.root, tmp_path / "moved"))
    split = split_dataset(dataset, seed=1)
    a = write_manifest(tmp_path / "a.json", dataset, split, 1, (0.7, 0.15, 0.15), PATTERN)
    b = write_manifest(tmp_path / "b.json", moved, split, 1, (0.7, 0.15, 0.15), PATTERN)
    assert a.root != b.root and a.manifest_hash == b.manifest_hash
    c = write_manifest(tmp_path / "c.json", dataset, split, 2, (0.7, 0.15, 0.15), PATTERN)
    assert c.manifest_hash != a.manifest_hash


def test_manifest_detects_changed_missing_and_new_files(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", [2, 2, 2])
    dataset = load_dataset(root)
    manifest = write_manifest(
        tmp_path / "m.json", dataset, split_dataset(dataset), 0, (0.7, 0.15, 0.15), PATTERN
    )
    assert cv2.imwrite(str(root / "images" / "vid01_frame_000.png"), np.zeros((4, 4), np.uint8))
    assert cv2.imwrite(str(root / "masks" / "vid02_frame_001.png"), np.ones((4, 4), np.uint8))
    (root / "images" / "vid00_frame_001.png").unlink()
    (root / "masks" / "vid00_frame_001.png").unlink()
    shutil.copy(root / "images" / "vid00_frame_000.png", root / "images" / "vid00_frame_009.png")
    shutil.copy(root / "masks" / "vid00_frame_000.png", root / "masks" / "vid00_frame_009.png")
    with pytest.raises(UserError) as info:
        check_manifest_matches(manifest, load_dataset(root))
    message = str(info.value)
    assert "vid01_frame_000.png: image file changed since the split was made" in message
    assert "vid02_frame_001.png: ground truth changed since the split was made" in message
    assert "vid00_frame_001.png: is in the manifest but not in the dataset" in message
    assert "vid00_frame_009.png: is new: not in the manifest" in message
    assert manifest.manifest_hash[:12] in message


def test_manifest_for_another_format_is_refused(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", [2, 2, 2])
    dataset = load_dataset(root)
    path = tmp_path / "m.json"
    write_manifest(path, dataset, split_dataset(dataset), 0, (0.7, 0.15, 0.15), PATTERN)
    entries = [{"image": i, "mask": [[0, 0, 2, 0, 2, 2]]} for i in dataset.ids]
    (root / "annotations.json").write_text(json.dumps(entries))
    with pytest.raises(UserError, match="made from a folders dataset, this one is sa2va"):
        check_manifest_matches(read_manifest(path), load_dataset(root))


def write_valid_manifest(dataset: Dataset, path: Path) -> dict:
    write_manifest(path, dataset, split_dataset(dataset), 0, (0.7, 0.15, 0.15), PATTERN)
    return json.loads(path.read_text())


def test_read_manifest_errors(dataset: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    with pytest.raises(UserError, match="does not exist"):
        read_manifest(path)
    document = write_valid_manifest(dataset, path)
    path.write_text(path.read_text()[:-20])
    with pytest.raises(UserError, match=r"m\.json is not valid JSON: .* at line \d+, column \d+"):
        read_manifest(path)
    del document["seed"]
    path.write_text(json.dumps(document))
    with pytest.raises(UserError, match=r"m\.json has no 'seed'; re-create it"):
        read_manifest(path)


def test_read_manifest_refuses_hand_edits(dataset: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    document = write_valid_manifest(dataset, path)
    moved = document["splits"]["train"].pop()
    document["splits"]["test"].append(moved)
    path.write_text(json.dumps(document))
    with pytest.raises(UserError, match="does not match its manifest_hash"):
        read_manifest(path)
    document = write_valid_manifest(dataset, path)
    document["root"] = "/elsewhere"  # the root is not part of the hash
    path.write_text(json.dumps(document))
    assert read_manifest(path).root == "/elsewhere"


# ------------------------------------------------------------------------------ check-data
def run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("orchestrator.commands.check_data",))
    return cli.main(argv)


def test_check_data_prints_summary_and_writes_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_dataset(tmp_path / "data", [4, 3, 3, 2, 2, 2, 2, 2])
    out = tmp_path / "split.json"
    assert (
        run_cli(["check-data", str(root), "--split-out", str(out), "--seed", "2"], monkeypatch) == 0
    )
    text = capsys.readouterr().out
    assert f"dataset:  {root} (folders)" in text
    assert "images:   20 (20 with ground truth, 0 without)" in text
    assert "groups:   8 (images per group: min 2, median 2, max 4)" in text
    manifest = read_manifest(out)
    split = split_dataset(load_dataset(root), seed=2)
    assert manifest.split == split and manifest.seed == 2
    for name, ids in zip(split._fields, split, strict=True):
        assert f"{name + ':':9} {len(ids)} images" in text
    assert f"manifest: {out} (manifest_hash {manifest.manifest_hash[:12]})" in text


def test_check_data_exits_2_on_bad_data_and_skips_with_skip_bad(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_dataset(tmp_path / "data", [2, 2, 2])
    (root / "images" / "vid00_frame_000.png").write_bytes(b"garbage")
    assert run_cli(["check-data", str(root)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "sa2va-rl check-data: error: 1 problem(s)" in err
    assert "images/vid00_frame_000.png: cannot decode image" in err and "--skip-bad" in err
    assert run_cli(["check-data", str(root), "--skip-bad"], monkeypatch) == 0
    text = capsys.readouterr().out
    assert "skipped:  1 bad entries" in text and "images/vid00_frame_000.png" in text
    assert "images:   5 (5 with ground truth, 0 without)" in text


def test_check_data_one_group_per_image_and_fractions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_dataset(tmp_path / "data", [10])
    argv = ["check-data", str(root), "--group-pattern", "none", "--fractions", "0.5,0.5,0"]
    assert run_cli(argv, monkeypatch) == 0
    text = capsys.readouterr().out
    assert "groups:   10 (images per group: min 1, median 1, max 1)" in text
    assert "train:    5 images (50.0%), 5 groups" in text and "test:     0 images" in text
