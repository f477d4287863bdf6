"""Dataset loading: the three formats, auto-detection, groups, and every bad-data error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import ImageFile

from envs.dataset_coco import decode_rle_string
from envs.dataset_files import rle_to_mask
from envs.datasets import DEFAULT_GROUP_PATTERN, load_dataset
from models.errors import UserError

H, W = 64, 48
NAME = "patientA(12)_1-3_1_051C3E6A_frame_000011.png"
GROUP = "patientA(12)_1-3_1_051C3E6A"
# Two overlapping rectangles: cv2.fillPoly fills boundaries, so each covers its corner
# coordinates inclusively; the overlap must stay filled (union, not even-odd XOR).
RECT_A = [10, 20, 30, 20, 30, 40, 10, 40]
RECT_B = [25, 30, 45, 30, 45, 35, 25, 35]


def expected_mask() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[20:41, 10:31] = True
    mask[30:36, 25:46] = True
    return mask


def rgb(seed: int = 0, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), pixels)


def make_sa2va(root: Path, entries: list[dict[str, Any]], images: dict[str, np.ndarray]) -> Path:
    for name, image in images.items():
        write_image(root / "images" / name, image)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations.json").write_text(json.dumps(entries))
    return root


def make_folders(root: Path, images: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> Path:
    for name, image in images.items():
        write_image(root / "images" / name, image)
    for name, mask in masks.items():
        write_image(root / "masks" / name, mask)
    return root


def coco_doc(images: list[dict], annotations: list[dict]) -> dict[str, Any]:
    categories = [{"id": 1, "name": "vessel"}, {"id": 2, "name": "catheter"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_coco(root: Path, doc: dict[str, Any], images: dict[str, np.ndarray]) -> Path:
    for name, image in images.items():
        write_image(root / "images" / name, image)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances.json").write_text(json.dumps(doc))
    return root


def one_image_coco(segmentations: list[Any], **image_fields: Any) -> dict[str, Any]:
    record = {"id": 7, "file_name": NAME, "height": H, "width": W, **image_fields}
    annotations = [
        {"id": 100 + i, "image_id": 7, "category_id": 1, "segmentation": seg}
        for i, seg in enumerate(segmentations)
    ]
    return coco_doc([record], annotations)


def user_error(path: Path, **kwargs: Any) -> str:
    with pytest.raises(UserError) as info:
        load_dataset(path, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- round trips
def test_sa2va_round_trip_exact_pixels(tmp_path: Path) -> None:
    image = rgb()
    root = make_sa2va(tmp_path, [{"image": NAME, "mask": [RECT_A, RECT_B]}], {NAME: image})
    dataset = load_dataset(root)
    assert (dataset.format, dataset.ids, len(dataset)) == ("sa2va", [NAME], 1)
    sample = dataset.load(NAME)
    assert sample.id == NAME and sample.group == GROUP
    assert sample.image.dtype == np.uint8 and np.array_equal(sample.image, image)
    assert sample.mask is not None and np.array_equal(sample.mask, expected_mask())
    assert dataset.has_masks and dataset.skipped == [] and dataset.notes == []


def test_sa2va_nested_per_text_polygons_give_the_same_mask(tmp_path: Path) -> None:
    # Sa2VA's own example nests one list of polygons per text.
    entry = {"image": NAME, "text": ["vessel", "branch"], "mask": [[RECT_A], [RECT_B]]}
    dataset = load_dataset(make_sa2va(tmp_path, [entry], {NAME: rgb()}))
    assert np.array_equal(dataset.load(NAME).mask, expected_mask())


def test_grey_image_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = rgb()[..., 0]
    dataset = load_dataset(make_sa2va(tmp_path, [{"image": NAME, "mask": [RECT_A]}], {NAME: grey}))
    image = dataset.load(NAME).image
    assert image.shape == (H, W, 3)
    for channel in range(3):
        assert np.array_equal(image[..., channel], grey)


def test_entry_without_mask_loads_with_none_when_masks_not_required(tmp_path: Path) -> None:
    other = "other.png"
    entries = [{"image": NAME, "mask": [RECT_A]}, {"image": other, "text": ["vessel"]}]
    root = make_sa2va(tmp_path, entries, {NAME: rgb(0), other: rgb(1)})
    message = user_error(root)
    assert "entry 1 ('other.png')" in message and "no 'mask'" in message
    dataset = load_dataset(root, require_masks=False)
    assert dataset.load(other).mask is None and not dataset.has_mask(other)
    assert dataset.has_mask(NAME) and not dataset.has_masks
    assert "1 of 2 image(s) have no ground truth" in dataset.notes


def test_folders_round_trip_nonzero_is_vessel(tmp_path: Path) -> None:
    mask = np.zeros((H, W), np.uint8)
    mask[3:9, 4:7] = 1  # any nonzero value counts
    mask[50, 40] = 255
    image = rgb()
    root = make_folders(tmp_path, {NAME: image}, {Path(NAME).stem + ".png": mask})
    dataset = load_dataset(root)
    assert dataset.format == "folders"
    sample = dataset.load(NAME)
    assert np.array_equal(sample.image, image) and np.array_equal(sample.mask, mask > 0)


def test_folders_colour_mask_any_channel_counts(tmp_path: Path) -> None:
    mask = np.zeros((H, W, 3), np.uint8)
    mask[5, 5] = (0, 0, 9)
    mask[6, 6] = (9, 0, 0)
    root = make_folders(tmp_path, {NAME: rgb()}, {Path(NAME).stem + ".png": mask})
    got = load_dataset(root).load(NAME).mask
    assert got is not None and got.sum() == 2 and got[5, 5] and got[6, 6]


def test_coco_polygons_and_category_filter(tmp_path: Path) -> None:
    doc = one_image_coco([[RECT_A], [RECT_B]])
    doc["annotations"][1]["category_id"] = 2  # RECT_B is a "catheter"
    root = make_coco(tmp_path, doc, {NAME: rgb()})
    assert np.array_equal(load_dataset(root).load(NAME).mask, expected_mask())
    only_vessel = load_dataset(root, categories=["vessel"]).load(NAME).mask
    reference = np.zeros((H, W), bool)
    reference[20:41, 10:31] = True
    assert np.array_equal(only_vessel, reference)
    assert "no category ['artery']" in user_error(root, categories=["artery"])


def test_coco_json_path_and_image_without_annotations(tmp_path: Path) -> None:
    doc = coco_doc([{"id": 1, "file_name": NAME}], [])
    root = make_coco(tmp_path, doc, {NAME: rgb()})
    dataset = load_dataset(root / "annotations" / "instances.json")
    assert dataset.root == root and dataset.format == "coco"
    mask = dataset.load(NAME).mask
    assert mask is not None and not mask.any()
    assert "1 image(s) have no annotations: their ground truth is empty" in dataset.notes


# Reference strings from pycocotools 2.0.11 ``mask.encode`` (not installed here; generated once).
RLE_6x5 = "5172L000O"
RLE_40x50 = "0h3be0lLR[O00000000000000000000000000000000000000000000000m5]O"


def small_rle_mask() -> np.ndarray:
    mask = np.zeros((6, 5), bool)
    mask[1:4, 2:5] = True
    mask[5, 0] = True
    return mask


def test_compressed_rle_decodes_like_pycocotools() -> None:
    assert np.array_equal(rle_to_mask(decode_rle_string(RLE_6x5), 6, 5), small_rle_mask())
    expected = np.zeros((40, 50), bool)
    expected[:, :3] = True
    expected[10:30, 20:45] = True
    expected[39, 49] = True
    assert np.array_equal(rle_to_mask(decode_rle_string(RLE_40x50), 40, 50), expected)
    # pycocotools frPyObjects({"counts": [2, 3, 1, 4], "size": [2, 5]}) -> this mask
    assert rle_to_mask([2, 3, 1, 4], 2, 5).astype(int).tolist() == [
        [0, 1, 1, 1, 1],
        [0, 1, 0, 1, 1],
    ]


def test_coco_rle_annotations_union_with_polygons(tmp_path: Path) -> None:
    small = {"size": [6, 5], "counts": RLE_6x5}
    name = "tiny_frame_000001.png"
    doc = {
        "images": [{"id": 1, "file_name": name, "height": 6, "width": 5}],
        "annotations": [
            {"id": 1, "image_id": 1, "segmentation": small},
            {"id": 2, "image_id": 1, "segmentation": {"size": [6, 5], "counts": [29, 1]}},
            {"id": 3, "image_id": 1, "segmentation": [[0, 0, 1, 0, 1, 1, 0, 1]]},
        ],
    }
    root = make_coco(tmp_path, doc, {name: rgb(0, 6, 5)})
    expected = small_rle_mask()
    expected[5, 4] = True  # last pixel in column-major order
    expected[0:2, 0:2] = True
    assert np.array_equal(load_dataset(root).load(name).mask, expected)


def test_three_formats_give_the_same_sample(tmp_path: Path) -> None:
    images = {NAME: rgb(0), "patientB(3)_1-1_2_AAAA0000_frame_000002.png": rgb(1)}
    polygons = {NAME: [RECT_A, RECT_B], "patientB(3)_1-1_2_AAAA0000_frame_000002.png": [RECT_B]}
    entries = [
        {"image": name, "text": ["vessel"], "mask": polys} for name, polys in polygons.items()
    ]
    sa2va = load_dataset(make_sa2va(tmp_path / "s", entries, images))
    records = [{"id": i, "file_name": name} for i, name in enumerate(images)]
    anns = [
        {"id": i, "image_id": i, "category_id": 1, "segmentation": polygons[name]}
        for i, name in enumerate(images)
    ]
    coco = load_dataset(make_coco(tmp_path / "c", coco_doc(records, anns), images))
    masks = {Path(n).stem + ".png": sa2va.load(n).mask.astype(np.uint8) * 255 for n in images}
    folders = load_dataset(make_folders(tmp_path / "f", images, masks))
    assert sa2va.ids == coco.ids == folders.ids == sorted(images)
    for name in images:
        a, b, c = sa2va.load(name), coco.load(name), folders.load(name)
        assert a.id == b.id == c.id and a.group == b.group == c.group
        assert np.array_equal(a.image, b.image) and np.array_equal(a.image, c.image)
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.mask, c.mask)


def test_auto_prefers_sa2va_and_says_so(tmp_path: Path) -> None:
    root = make_sa2va(tmp_path, [{"image": NAME, "mask": [RECT_A]}], {NAME: rgb()})
    make_folders(root, {}, {Path(NAME).stem + ".png": np.zeros((H, W), np.uint8)})
    dataset = load_dataset(root)
    assert dataset.format == "sa2va"
    assert any("auto-detected as sa2va" in note and "folders" in note for note in dataset.notes)
    assert load_dataset(root, fmt="folders").format == "folders"


def test_annotations_json_holding_coco_is_read_as_coco(tmp_path: Path) -> None:
    doc = one_image_coco([[RECT_A], [RECT_B]])
    write_image(tmp_path / "images" / NAME, rgb())
    (tmp_path / "annotations.json").write_text(json.dumps(doc))
    for fmt in ("auto", "coco"):
        dataset = load_dataset(tmp_path, fmt=fmt)
        assert dataset.format == "coco" and np.array_equal(dataset.load(NAME).mask, expected_mask())


def test_sa2va_without_images_folder(tmp_path: Path) -> None:
    (tmp_path / "annotations.json").write_text(json.dumps([{"image": NAME, "mask": [RECT_A]}]))
    assert f"no images/ folder next to {tmp_path / 'annotations.json'}" in user_error(tmp_path)


def test_undetectable_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    message = user_error(tmp_path)
    assert "cannot tell the dataset format" in message and str(tmp_path) in message


def test_lazy_load_refuses_a_file_changed_after_validation(tmp_path: Path) -> None:
    root = make_sa2va(tmp_path, [{"image": NAME, "mask": [RECT_A]}], {NAME: rgb(0)})
    dataset = load_dataset(root)
    write_image(root / "images" / NAME, rgb(1))
    with pytest.raises(UserError, match="changed since the dataset was checked"):
        dataset.load(NAME)


# ----------------------------------------------------------------------------------- groups
def test_default_group_pattern_and_alternatives(tmp_path: Path) -> None:
    names = [NAME, "patientA(12)_1-3_1_051C3E6A_frame_000012.png", "loose.png"]
    entries = [{"image": name, "mask": [RECT_A]} for name in names]
    root = make_sa2va(tmp_path, entries, {name: rgb(i) for i, name in enumerate(names)})
    dataset = load_dataset(root)
    assert dataset.groups() == {GROUP: sorted(names[:2]), "loose.png": ["loose.png"]}
    assert any("1 of 3 image name(s) do not match" in note for note in dataset.notes)
    per_image = load_dataset(root, group_pattern=None)
    assert [per_image.group_of(n) for n in names] == names and per_image.notes == []
    by_patient = load_dataset(root, group_pattern=r"^(?P<group>[^(]+)\(")
    assert by_patient.group_of(NAME) == "patientA"
    assert "not a valid regex" in user_error(root, group_pattern="(")
    assert "no named group 'group'" in user_error(root, group_pattern=r"_frame_\d+")
    assert DEFAULT_GROUP_PATTERN == r"^(?P<group>.+)_frame_\d+$"


# --------------------------------------------------------------------------------- bad data
def single(tmp_path: Path, mask: Any, image: np.ndarray | None = None) -> Path:
    images = {} if image is None else {NAME: image}
    return make_sa2va(tmp_path, [{"image": NAME, "mask": mask}], images)


def test_missing_image(tmp_path: Path) -> None:
    message = user_error(single(tmp_path, [RECT_A]))
    assert "entry 0 ('patientA(12)" in message and "image file not found" in message
    assert str(tmp_path / "images" / NAME) in message and "--skip-bad" in message


def test_unreadable_image(tmp_path: Path) -> None:
    root = single(tmp_path, [RECT_A], rgb())
    (root / "images" / NAME).write_bytes(b"this is not a PNG")
    message = user_error(root)
    assert "cannot decode image" in message and NAME in message and "replace the file" in message


def truncated_jpeg_dataset(tmp_path: Path) -> Path:
    name = "cut_frame_000001.jpg"
    root = make_sa2va(tmp_path, [{"image": name, "mask": [RECT_A]}], {name: rgb()})
    data = (root / "images" / name).read_bytes()
    (root / "images" / name).write_bytes(data[: len(data) // 2])
    return root


def test_truncated_jpeg(tmp_path: Path) -> None:
    message = user_error(truncated_jpeg_dataset(tmp_path))
    assert "cut_frame_000001.jpg" in message and "truncated" in message


def test_truncated_jpeg_caught_even_when_pil_tolerates_truncation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    message = user_error(truncated_jpeg_dataset(tmp_path))
    assert "cut_frame_000001.jpg" in message and "no JPEG end-of-image marker" in message


def test_polygon_with_too_few_points(tmp_path: Path) -> None:
    message = user_error(single(tmp_path, [RECT_A, [1, 1, 5, 5]], rgb()))
    assert "entry 0 ('patientA" in message and "mask[1] has 2 point(s)" in message
    assert "at least 3" in message


def test_polygon_with_odd_number_of_values(tmp_path: Path) -> None:
    message = user_error(single(tmp_path, [[1, 1, 5, 5, 9]], rgb()))
    assert "mask[0] has an odd number of values (5)" in message


def test_polygon_outside_the_image(tmp_path: Path) -> None:
    inside_tolerance = [0, 0, W + 1, 0, W + 1, H + 1]  # 1 px over the edge is accepted
    load_dataset(single(tmp_path / "ok", [inside_tolerance], rgb()))
    message = user_error(single(tmp_path / "bad", [RECT_A, [0, 0, 10, 0, 10, H + 2]], rgb()))
    assert "mask[1] has point (10, 66) outside the 48x64 image" in message
    assert "entry 0 ('patientA" in message


def test_non_numeric_polygon(tmp_path: Path) -> None:
    message = user_error(single(tmp_path, [[1, 2, "3", 4, 5, 6]], rgb()))
    assert "mask[0] must be a flat list of numbers" in message


def test_mask_file_of_the_wrong_size(tmp_path: Path) -> None:
    mask = np.zeros((H + 1, W), np.uint8)
    root = make_folders(tmp_path, {NAME: rgb()}, {Path(NAME).stem + ".png": mask})
    message = user_error(root)
    assert f"images/{NAME}" in message and "48x65 (WxH)" in message and "48x64" in message


def test_folders_image_without_mask(tmp_path: Path) -> None:
    root = make_folders(tmp_path, {NAME: rgb(), "b.png": rgb(1)}, {"b.png": np.ones((H, W))})
    message = user_error(root)
    assert f"images/{NAME}: has no mask" in message
    assert load_dataset(root, require_masks=False).load(NAME).mask is None


def test_coco_rle_and_declared_size_mismatch(tmp_path: Path) -> None:
    rle = {"size": [H, W + 1], "counts": [H * (W + 1)]}
    message = user_error(make_coco(tmp_path / "a", one_image_coco([rle]), {NAME: rgb()}))
    assert f"image '{NAME}' (id 7)" in message and "annotation id 100" in message
    assert "RLE size is 49x64 (WxH)" in message
    doc = one_image_coco([[RECT_A]], width=W + 5)
    message = user_error(make_coco(tmp_path / "b", doc, {NAME: rgb()}))
    assert "the annotations declare 53x64 (WxH)" in message


def test_coco_corrupt_rle(tmp_path: Path) -> None:
    short = [{"size": [H, W], "counts": RLE_6x5}]
    message = user_error(make_coco(tmp_path / "a", one_image_coco(short), {NAME: rgb()}))
    assert f"image '{NAME}' (id 7): annotation id 100: RLE runs cover 30 pixels" in message
    garbage = [{"size": [H, W], "counts": "ab~"}]
    message = user_error(make_coco(tmp_path / "b", one_image_coco(garbage), {NAME: rgb()}))
    assert "annotation id 100: compressed RLE 'counts' is corrupt" in message
    assert "invalid character '~' at position 2" in message


def test_coco_annotation_for_unknown_image(tmp_path: Path) -> None:
    doc = one_image_coco([[RECT_A]])
    doc["annotations"].append({"id": 55, "image_id": 999, "segmentation": [RECT_B]})
    message = user_error(make_coco(tmp_path, doc, {NAME: rgb()}))
    assert "annotation id 55: refers to image_id 999" in message


def test_empty_datasets(tmp_path: Path) -> None:
    assert "contains no images" in user_error(make_sa2va(tmp_path / "s", [], {}))
    (tmp_path / "f" / "images").mkdir(parents=True)
    (tmp_path / "f" / "masks").mkdir()
    assert "contains no images" in user_error(tmp_path / "f")


def test_duplicate_image_names(tmp_path: Path) -> None:
    entries = [{"image": NAME, "mask": [RECT_A]}, {"image": NAME, "mask": [RECT_B]}]
    message = user_error(make_sa2va(tmp_path, entries, {NAME: rgb()}))
    assert "2 problem(s)" in message and "duplicate image name" in message
    assert "entry 0 (" in message and "entry 1 (" in message


def test_duplicate_stems_in_folders(tmp_path: Path) -> None:
    images = {"a.png": rgb(0), "a.jpg": rgb(1)}
    root = make_folders(tmp_path, images, {"a.png": np.ones((H, W), np.uint8)})
    message = user_error(root)
    assert "duplicate image name: a.jpg, a.png share a stem" in message


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "annotations.json").write_text('[\n  {"image": "a.png",\n   "mask": [1, 2,]}\n]')
    message = user_error(tmp_path)
    assert "annotations.json is not valid JSON" in message and "line 3, column 18" in message


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"entries": []}, "neither a Sa2VA annotations list nor a COCO dict"),
        ([{"mask": [RECT_A]}], "entry 0: has no 'image' key"),
        (["a.png"], "entry 0: is a str, expected an object"),
        ([{"image": NAME, "mask": "polygon"}], "'mask' must be a list of flat polygons"),
    ],
)
def test_wrong_json_structure(tmp_path: Path, document: Any, expected: str) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations.json").write_text(json.dumps(document))
    assert expected in user_error(tmp_path)


def test_all_problems_are_collected_and_the_list_is_capped(tmp_path: Path) -> None:
    entries = [{"image": f"missing_{i:02d}.png", "mask": [RECT_A]} for i in range(25)]
    message = user_error(make_sa2va(tmp_path, entries, {}))
    assert "25 problem(s)" in message and "missing_19.png" in message
    assert "missing_20.png" not in message and "... and 5 more" in message


def test_skip_bad_keeps_the_good_entries(tmp_path: Path) -> None:
    entries = [
        {"image": NAME, "mask": [RECT_A]},
        {"image": "gone.png", "mask": [RECT_A]},
        {"image": "short.png", "mask": [[1, 2, 3, 4]]},
    ]
    images = {NAME: rgb(0), "short.png": rgb(1)}
    dataset = load_dataset(make_sa2va(tmp_path, entries, images), skip_bad=True)
    assert dataset.ids == [NAME]
    assert [entry for entry, _ in dataset.skipped] == [
        "entry 1 ('gone.png')",
        "entry 2 ('short.png')",
    ]
    assert "image file not found" in dataset.skipped[0][1]


def test_skip_bad_with_nothing_left_is_an_error(tmp_path: Path) -> None:
    entries = [{"image": "gone.png", "mask": [RECT_A]}]
    message = user_error(make_sa2va(tmp_path, entries, {}), skip_bad=True)
    assert "all 1 entries are bad" in message and "gone.png" in message


def test_progress_bar_only_for_many_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = np.zeros((4, 4, 3), np.uint8)
    names = {f"v_frame_{i:04d}.png": tiny for i in range(201)}
    masks = {name: np.zeros((4, 4), np.uint8) for name in names}
    load_dataset(make_folders(tmp_path, names, masks))
    assert "checking images" in capsys.readouterr().err
    small = make_folders(tmp_path / "small", {"a.png": tiny}, {"a.png": np.zeros((4, 4))})
    load_dataset(small)
    assert capsys.readouterr().err == ""
