"""Sa2VASegmenter against a tiny Sa2VA-like model folder written by the tests.

The folder (``tests/tiny_sa2va``) has remote code, safetensors weights and a custom tokenizer, and
is loaded through the same ``AutoModel/AutoTokenizer.from_pretrained(trust_remote_code=True)``
path as a real checkpoint. Its "segmentation" is image darkness, so the expected masks are known:
on the test image the dark horizontal stripe is rows 10..19 and nothing else.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sa2va import write_tiny_sa2va

from models.errors import UserError
from models.sa2va import (
    FLAG_MULTIPLE_SEG_TOKENS,
    FLAG_NO_SEG_TOKEN,
    FLAG_PROB_UNAVAILABLE,
    Sa2VASegmenter,
    folder_digest,
    format_prompt,
    source,
)
from models.segmentation import Segmenter

PROMPT = "Please segment the blood vessel."
NO_SEG_PROMPT = "Please describe the image."
TWO_SEG_PROMPT = "Please segment both vessels."
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def stripe_image() -> np.ndarray:
    """40x60 light image with a dark stripe on rows 10..19."""
    image = np.full((40, 60, 3), 220, np.uint8)
    image[10:20] = 20
    return image


def stripe_mask() -> np.ndarray:
    mask = np.zeros((40, 60), bool)
    mask[10:20] = True
    return mask


def upscale2(array: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(array, 2, axis=0), 2, axis=1)


def near_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of the other value."""
    padded = np.pad(mask, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    shifted = (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:])
    return np.logical_or.reduce([s != centre for s in shifted])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sa2va(tmp_path_factory.mktemp("models") / "tiny_sa2va_v2")


@pytest.fixture(scope="module")
def segmenter(tiny_folder: Path) -> Sa2VASegmenter:
    return Sa2VASegmenter(tiny_folder, device="cpu")


def test_prompt_gets_only_the_image_token() -> None:
    assert format_prompt(PROMPT) == "<image>Please segment the blood vessel."
    assert format_prompt(" segment the vessels ") == "<image>segment the vessels"
    assert format_prompt("<image>\nPlease segment it.") == "<image>\nPlease segment it."
    for empty in (" . ", "<image>"):
        with pytest.raises(ValueError, match="prompt"):
            format_prompt(empty)


def test_prompt_reaches_the_model_verbatim(segmenter: Sa2VASegmenter) -> None:
    segmenter.segment(stripe_image(), PROMPT)
    # The tiny model answers from its word-level tokenization of exactly that text.
    assert segmenter.model.last_answer == "sure , [SEG] . </s>"


def test_segment_gives_mask_soft_mask_and_score(segmenter: Sa2VASegmenter) -> None:
    assert isinstance(segmenter, Segmenter)
    result = segmenter.segment(stripe_image(), PROMPT)

    assert result.mask.dtype == np.bool_ and result.mask.shape == (40, 60)
    np.testing.assert_array_equal(result.mask, stripe_mask())
    assert result.prob is not None
    assert result.prob.dtype == np.float32 and result.prob.shape == (40, 60)
    assert result.prob.min() >= 0.0 and result.prob.max() <= 1.0
    np.testing.assert_array_equal(result.prob > 0.5, result.mask)
    # Dark stripe well inside the mask, light background well outside.
    assert result.prob[15].min() > 0.9 and result.prob[30].max() < 0.1
    # The score is the IoU of the candidate SAM2 selected (argmax of its three), as computed.
    decoder = segmenter.model.grounding_encoder.sam2_model.sam_mask_decoder
    ious = decoder.last_ious[0]
    assert ious.shape == (3,) and int(ious.argmax()) == 1 and float(ious[0]) < float(ious[1])
    assert result.score == float(ious[1])
    assert result.flags == ()
    # What was captured is what the model thresholded: logits at SAM2's 1024x1024.
    (capture,) = segmenter._recorder.captures
    assert capture.logits.shape == (1, 1, 1024, 1024) and capture.logits.dtype == torch.float32


def test_soft_mask_thresholds_to_the_model_mask(segmenter: Sa2VASegmenter) -> None:
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    model = segmenter.model
    own = model.predict_forward(image=Image.fromarray(image), text=f"<image>{PROMPT}",
                                tokenizer=segmenter._tokenizer)  # fmt: skip
    result = segmenter.segment(image, PROMPT)
    assert result.prob is not None and result.flags == ()
    np.testing.assert_array_equal(result.mask, own["prediction_masks"][0][0])
    np.testing.assert_array_equal(result.prob > 0.5, own["prediction_masks"][0][0])


def test_two_seg_tokens_give_union_max_and_first_score(segmenter: Sa2VASegmenter) -> None:
    decoder = segmenter.model.grounding_encoder.sam2_model.sam_mask_decoder
    decoder.iou_log.clear()
    result = segmenter.segment(stripe_image(), TWO_SEG_PROMPT)
    assert segmenter.model.last_answer == "sure , [SEG] and [SEG] . </s>"
    first, second = (float(ious[0].max()) for ious in decoder.iou_log)
    assert first != second and result.score == first
    assert result.flags == (FLAG_MULTIPLE_SEG_TOKENS,)
    first_prob, second_prob = (capture.logits for capture in segmenter._recorder.captures)
    assert not torch.equal(first_prob, second_prob)
    assert result.prob is not None
    np.testing.assert_array_equal(result.prob > 0.5, result.mask)
    np.testing.assert_array_equal(result.mask, stripe_mask())


def test_model_stays_in_requested_dtype(segmenter: Sa2VASegmenter) -> None:
    # The remote code would cast itself to bfloat16 on the first call unless prepared first.
    segmenter.segment(stripe_image(), PROMPT)
    assert segmenter.dtype == torch.float32
    assert {p.dtype for p in segmenter.model.parameters()} == {torch.float32}


def test_answer_without_seg_token_gives_flagged_empty_mask(segmenter: Sa2VASegmenter) -> None:
    result = segmenter.segment(stripe_image(), NO_SEG_PROMPT)
    assert segmenter.model.last_answer == "it is an angiogram . </s>"
    assert not segmenter._recorder.captures
    assert result.flags == (FLAG_NO_SEG_TOKEN,)
    assert result.mask.shape == (40, 60) and not result.mask.any()
    assert result.prob is not None
    np.testing.assert_array_equal(result.prob, np.zeros((40, 60), np.float32))
    assert result.score is None


def test_concurrent_calls_are_serialised(segmenter: Sa2VASegmenter) -> None:
    image = stripe_image()
    expected = segmenter.segment(image, PROMPT)
    prompts = [PROMPT, NO_SEG_PROMPT] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p: segmenter.segment(image, p), prompts))
    for prompt, result in zip(prompts, results, strict=True):
        if prompt == PROMPT:
            np.testing.assert_array_equal(result.prob, expected.prob)
            assert result.score == expected.score and result.flags == ()
        else:
            assert result.flags == (FLAG_NO_SEG_TOKEN,)


def test_backend_id_follows_the_weights(tmp_path: Path) -> None:
    folder = write_tiny_sa2va(tmp_path / "tiny_sa2va_v2")
    first = Sa2VASegmenter(folder, device="cpu")
    again = Sa2VASegmenter(folder, device="cpu")
    assert first.backend_id == again.backend_id
    assert first.backend_id.startswith(f"sa2va:{folder.resolve()}@")
    assert ":float32:cpu:prompt-v2:post-1:" in first.backend_id
    assert first.backend_id.endswith(":cap-none")

    write_tiny_sa2va(folder, darkness_gain=4.0)
    changed = Sa2VASegmenter(folder, device="cpu")
    assert changed.backend_id != first.backend_id
    # ...and the outputs did change with it.
    old, new = first.segment(stripe_image(), PROMPT), changed.segment(stripe_image(), PROMPT)
    assert old.prob is not None and new.prob is not None
    assert not np.array_equal(old.prob, new.prob)

    changed.input_cap = 32
    assert changed.backend_id.endswith(":cap-32")


def test_large_files_enter_the_digest_by_size_and_mtime(
    tiny_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source, "CONTENT_HASH_MAX_BYTES", 0)
    weights = tiny_folder / "model.safetensors"
    before = folder_digest(tiny_folder)
    stat = weights.stat()
    try:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert folder_digest(tiny_folder) != before
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert folder_digest(tiny_folder) == before


def test_input_cap_round_trip_with_soft_mask(segmenter: Sa2VASegmenter) -> None:
    small = stripe_image()
    big = upscale2(small)  # 80x120; box-downscaling by 2 gives `small` back exactly
    reference = segmenter.segment(small, PROMPT)
    segmenter.input_cap = 60
    try:
        capped = segmenter.segment(big, PROMPT)
        assert segmenter.model.last_image_size == (60, 40)  # PIL (width, height)
    finally:
        segmenter.input_cap = None

    assert capped.mask.shape == (80, 120) and capped.prob is not None
    assert capped.prob.shape == (80, 120) and capped.prob.dtype == np.float32
    np.testing.assert_array_equal(capped.prob > 0.5, capped.mask)
    assert capped.score == reference.score and capped.flags == ()
    # Logits resized straight to 80x120 match the 2x-upscaled small mask off its boundary.
    expected = upscale2(reference.mask)
    off_boundary = ~near_boundary(expected)
    np.testing.assert_array_equal(capped.mask[off_boundary], expected[off_boundary])


def test_without_capture_prob_is_none_and_cap_upscales_nearest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A checkpoint whose SAM2 module has another name: no logits to capture.
    folder = write_tiny_sa2va(tmp_path / "renamed", grounding_attr="sam_grounder")
    seg = Sa2VASegmenter(folder, device="cpu")
    with caplog.at_level(logging.WARNING, logger="models.sa2va.segmenter"):
        small = seg.segment(stripe_image(), PROMPT)
        seg.input_cap = 60
        capped = seg.segment(upscale2(stripe_image()), PROMPT)

    assert small.prob is None and small.score is None
    assert small.flags == (FLAG_PROB_UNAVAILABLE,)
    np.testing.assert_array_equal(small.mask, stripe_mask())
    assert capped.flags == (FLAG_PROB_UNAVAILABLE,)
    np.testing.assert_array_equal(capped.mask, upscale2(small.mask))
    warnings = [r for r in caplog.records if "soft masks unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "grounding_encoder" in warnings[0].getMessage()


def test_capture_that_disagrees_with_the_model_mask_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The model shifts the logits after language_embd_inference: the capture is not what it
    # thresholded, so the soft mask would lie.
    folder = write_tiny_sa2va(tmp_path / "shifted", post_capture_bias=5.0)
    seg = Sa2VASegmenter(folder, device="cpu")
    with caplog.at_level(logging.WARNING, logger="models.sa2va.segmenter"):
        result = seg.segment(stripe_image(), PROMPT)
    assert result.prob is None and result.flags == (FLAG_PROB_UNAVAILABLE,)
    assert result.mask.sum() > stripe_mask().sum()  # the model's own (shifted) mask is kept
    assert result.score is not None
    assert any("differs from the model's mask" in r.getMessage() for r in caplog.records)


def test_close_removes_the_hooks(tmp_path: Path) -> None:
    seg = Sa2VASegmenter(write_tiny_sa2va(tmp_path / "tiny_sa2va_v2"), device="cpu")
    encoder = seg.model.grounding_encoder
    decoder = encoder.sam2_model.sam_mask_decoder
    assert "language_embd_inference" in vars(encoder) and decoder._forward_hooks
    seg.close()
    assert "language_embd_inference" not in vars(encoder) and not decoder._forward_hooks
    with pytest.raises(RuntimeError, match="close"):
        seg.segment(stripe_image(), PROMPT)


def test_missing_folder_says_how_to_get_the_weights(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        Sa2VASegmenter(tmp_path / "Sa2VA-4B", device="cpu")
    message = str(error.value)
    assert str(tmp_path / "Sa2VA-4B") in message
    assert "huggingface-cli download ByteDance/Sa2VA-4B --local-dir" in message
    assert "pip install .[sa2va]" in message


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match=r"has no config\.json"):
        Sa2VASegmenter(tmp_path / "half", device="cpu")


def test_unpinned_hub_id_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so "ByteDance/Sa2VA-4B" cannot be a local folder
    with pytest.raises(UserError, match="without a pinned revision"):
        Sa2VASegmenter("ByteDance/Sa2VA-4B", device="cpu")
    with pytest.raises(UserError, match="not a 40-hex commit"):
        Sa2VASegmenter("ByteDance/Sa2VA-4B", revision="main", device="cpu")


def test_unpinned_hub_id_is_identified_by_its_cached_snapshot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import huggingface_hub

    snapshot = f"/hf/hub/models--ByteDance--Sa2VA-4B/snapshots/{COMMIT}/config.json"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: snapshot)
    assert source.cached_commit("ByteDance/Sa2VA-4B") == COMMIT
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    assert source.cached_commit("ByteDance/Sa2VA-4B") is None


@pytest.mark.parametrize(
    ("revision", "allow_unpinned"), [(COMMIT, False), (None, True)], ids=["pinned", "allowed"]
)
def test_hub_id_loads_remote_code_at_the_revision(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    revision: str | None,
    allow_unpinned: bool,
) -> None:
    import transformers

    monkeypatch.chdir(tmp_path)
    calls: list[dict[str, Any]] = []

    def offline(name: str, **kwargs: Any) -> None:
        calls.append({"name": name, **kwargs})
        raise OSError("no connection to huggingface.co")

    def cached(name: str, **kwargs: Any) -> Any:
        calls.append({"name": name, **kwargs})
        return SimpleNamespace(auto_map={})

    # Config and tokenizer (loaded first, under the remote-code lock) come from the cache here.
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", cached)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", cached)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", offline)
    with pytest.raises(
        UserError, match="could not load Sa2VA from the Hub id 'ByteDance/Sa2VA-4B'"
    ):
        Sa2VASegmenter(
            "ByteDance/Sa2VA-4B",
            revision=revision,
            device="cpu",
            allow_unpinned_remote_code=allow_unpinned,
        )
    for call in calls:
        assert call["name"] == "ByteDance/Sa2VA-4B" and call.get("revision") == revision
        assert call["trust_remote_code"] is True and call["local_files_only"] is False
    assert [call.get("dtype") for call in calls] == [None, None, torch.float32]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "gpu0"}, "device 'gpu0'"),
        ({"dtype": "int8"}, "dtype 'int8'"),
        ({"input_cap": 0}, "input_cap"),
        ({"revision": COMMIT}, "only applies to a Hub id"),
    ],
)
def test_bad_options_are_user_errors(
    tiny_folder: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(UserError, match=message):
        Sa2VASegmenter(tiny_folder, **{"device": "cpu", **kwargs})
