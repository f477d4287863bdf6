"""The built-in synthetic angiogram dataset: determinism, content, on-disk format, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.morphology import skeletonize

from envs.polygons import MIN_POLYGON_POINTS, mask_to_polygons, rasterize_polygons
from envs.synthetic import frame_name, generate_samples, group_of, write_dataset
from envs.synthetic_scene import make_video
from models.errors import UserError
from models.metrics import dice
from orchestrator.cli import EXIT_USER_ERROR, main

NAME_PATTERN = re.compile(r"^synth\((\d{3})\)_1-\d_\d_[0-9A-F]{8}_frame_(\d{6})\.jpg$")


@pytest.fixture(scope="module")
def two_videos() -> list:
    """16 default frames: videos 0 and 1 (video 1 has a catheter)."""
    return generate_samples(16)


def test_same_seed_gives_identical_samples_and_another_seed_does_not(two_videos: list) -> None:
    again = generate_samples(10)  # a prefix: the first frames do not depend on n
    for a, b in zip(two_videos[:10], again, strict=True):
        assert a.id == b.id
        assert a.image.tobytes() == b.image.tobytes()
        assert a.mask.tobytes() == b.mask.tobytes()
    other = generate_samples(1, seed=1)[0]
    assert other.id != two_videos[0].id
    assert not np.array_equal(other.mask, two_videos[0].mask)


def test_samples_are_grey_rgb_uint8_with_bool_masks(two_videos: list) -> None:
    for sample in two_videos:
        assert sample.image.shape == (512, 512, 3) and sample.image.dtype == np.uint8
        assert np.array_equal(sample.image[..., 0], sample.image[..., 1])
        assert np.array_equal(sample.image[..., 0], sample.image[..., 2])
        assert sample.mask.shape == (512, 512) and sample.mask.dtype == np.bool_
        assert 0.01 < sample.mask.mean() < 0.12


def test_names_follow_the_real_pattern_and_groups_are_videos(two_videos: list) -> None:
    assert frame_name(0, 3, 11).startswith("synth(003)_1-4_2_")
    assert frame_name(0, 3, 11).endswith("_frame_000011.jpg")
    for index, sample in enumerate(two_videos):
        match = NAME_PATTERN.match(sample.id)
        assert match, sample.id
        assert (int(match[1]), int(match[2])) == divmod(index, 8)
        assert sample.group == group_of(sample.id) == sample.id.split("_frame_")[0]
    assert len({s.group for s in two_videos}) == 2
    assert [s.group for s in generate_samples(5, frames_per_video=2)].count(
        two_videos[0].group
    ) == 2


def test_vessels_are_1_to_12_px_wide_with_thin_and_thick_ones(two_videos: list) -> None:
    for sample in two_videos[::4]:
        inside = cv2.distanceTransform(sample.mask.astype(np.uint8), cv2.DIST_L2, 5)
        # On the centre line the distance to the background is half the width (+0.5 px).
        widths = 2 * inside[skeletonize(sample.mask)] - 1
        assert widths.min() >= 1
        assert np.percentile(widths, 99) <= 12
        assert np.mean(widths <= 2) > 0.2  # thin distal vessels
        assert widths.max() >= 8  # a main artery


def test_frames_of_a_video_share_a_tree_and_videos_differ(two_videos: list) -> None:
    firsts = [two_videos[0].mask, two_videos[8].mask]
    within, across = [], []
    for index, sample in enumerate(two_videos):
        video = index // 8
        scores = [dice(sample.mask, first) for first in firsts]
        assert int(np.argmax(scores)) == video
        if index % 8:
            within.append(scores[video])
        across.append(scores[1 - video])
    assert np.mean(within) > 0.3
    assert np.mean(within) > 3 * np.mean(across)
    # Not one frame repeated: the deformation moves the vessels.
    assert all(score < 0.95 for score in within)


def test_catheter_is_dark_but_not_ground_truth(two_videos: list) -> None:
    assert make_video(0, 0, 512).catheter is None
    catheter = make_video(0, 1, 512).catheter
    assert catheter is not None
    sample = two_videos[8]  # frame 0 of video 1: the catheter barely moves
    grey = sample.image[..., 0].astype(float)
    points = np.rint(catheter.points).astype(int)
    on_image = (points >= 0).all(1) & (points < 512).all(1)
    xs, ys = points[on_image, 0], points[on_image, 1]
    off_gt = ~sample.mask[ys, xs]
    assert off_gt.mean() > 0.8
    local_background = cv2.blur(grey, (41, 41))[ys, xs]
    assert np.median((local_background - grey[ys, xs])[off_gt]) > 20


def test_polygons_round_trip_and_short_ones_are_dropped() -> None:
    mask = np.zeros((20, 20), bool)
    mask[2:8, 3:12] = True
    mask[15, 15] = True  # a one-pixel speck: its contour has < 3 points
    polygons = mask_to_polygons(mask)
    assert all(len(p) >= 2 * MIN_POLYGON_POINTS for p in polygons)
    expected = mask.copy()
    expected[15, 15] = False
    assert np.array_equal(rasterize_polygons(polygons, 20, 20), expected)
    assert not rasterize_polygons([[1, 1, 5, 5]], 20, 20).any()
    # Overlapping polygons add up (no even-odd cancelling).
    square = [0, 0, 9, 0, 9, 9, 0, 9]
    assert rasterize_polygons([square, square], 20, 20).sum() == 100


def test_written_dataset_matches_memory_to_the_pixel(tmp_path: Path) -> None:
    out = write_dataset(tmp_path / "data", n=10, seed=0, frames_per_video=4, progress=False)
    entries = json.loads((out / "annotations.json").read_text())
    samples = generate_samples(10, seed=0, frames_per_video=4)
    assert [e["image"] for e in entries] == [s.id for s in samples]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(s.id for s in samples)
    for entry, sample in zip(entries, samples, strict=True):
        assert entry["text"] == ["blood vessel"]
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in entry["mask"])
        png = cv2.imread(str(out / "masks" / (Path(entry["image"]).stem + ".png")), -1)
        assert png.dtype == np.uint8 and png.ndim == 2 and set(np.unique(png)) == {0, 255}
        assert np.array_equal(rasterize_polygons(entry["mask"], 512, 512), png == 255)
        assert np.array_equal(png == 255, sample.mask)
        jpg = cv2.imread(str(out / "images" / entry["image"]), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(jpg, sample.image[..., 0])
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging left behind


def test_write_refuses_a_non_empty_directory_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    write_dataset(out, n=1, progress=False)  # an empty directory is fine
    with pytest.raises(UserError, match=r"not empty.*--overwrite"):
        write_dataset(out, n=2, progress=False)
    write_dataset(out, n=2, overwrite=True, progress=False)
    assert len(list((out / "images").iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_cli_writes_the_dataset_and_is_deterministic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a", "b"):
        code = main(["demo-data", str(tmp_path / name), "--n", "5", "--frames-per-video", "2"])
        assert code == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert summary[0] == f"wrote 5 images from 3 videos (seed 0) to {tmp_path / 'a'}"
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    assert files_a == files_b and len(files_a) == 2 + 1 + 5 + 5
    for rel in files_a:
        if (tmp_path / "a" / rel).is_file():
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_cli_refuses_a_non_empty_out_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["demo-data", str(tmp_path), "--n", "2"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "sa2va-rl demo-data: error:" in err
    assert str(tmp_path) in err and "--overwrite" in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_cli_rejects_bad_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo-data", "somewhere", "--n", "0"])
    assert exit_info.value.code == 2
    assert "--n: must be at least 1, got 0" in capsys.readouterr().err
