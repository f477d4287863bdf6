"""One image, many prompts: the Sa2VA backend runs each image-only encoder once per image and
answers exactly as the per-prompt path does, on the tiny v2, Qwen and v1 fixtures (float32 on the
CPU, so "exactly" means bit for bit); generation is bounded by ``max_new_tokens``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from test_sa2va_backend import NO_SEG_PROMPT, PROMPT, TWO_SEG_PROMPT, stripe_image, stripe_mask
from tiny_sa2va import build_from_folder, write_tiny_sa2va

from models.sa2va import Sa2VASegmenter, loading
from models.sa2va import generations as gen
from models.sa2va.answer_limit import FLAG_ANSWER_TRUNCATED
from models.sa2va.capture import FLAG_MULTIPLE_SEG_TOKENS, FLAG_NO_SEG_TOKEN
from models.sa2va.image_work import ImageWork
from models.segmentation import Segmentation

PROMPTS = [PROMPT, NO_SEG_PROMPT, TWO_SEG_PROMPT, "Please segment the thin vessels."]
# Per-prompt path: a vision run per prompt, a SAM2 image-encoder run per [SEG] token (1+0+2+1).
PER_PROMPT_CALLS = {"vision": 4, "sam2": 4}
SHARED_CALLS = {"vision": 1, "sam2": 1}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("image_work")
    return {v: write_tiny_sa2va(base / f"tiny_sa2va_{v}", variant=v) for v in ("v2", "qwen", "v1")}


@pytest.fixture(scope="module")
def segmenters(folders: dict[str, Path]) -> Iterator[dict[str, Sa2VASegmenter]]:
    """One segmenter per variant. The v1 model is built from its own code (transformers 4.57
    refuses its config class, as upstream's) and handed to the segmenter as loaded."""
    patch = pytest.MonkeyPatch()
    processor = SimpleNamespace(tokenizer=object(), image_processor=object())
    patch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: processor)
    found = {v: Sa2VASegmenter(folders[v], device="cpu") for v in ("v2", "qwen")}
    real_load = loading.load_model

    def load_v1(source: Any, checkpoint: Any, dtype: torch.dtype, device: Any) -> tuple:
        _, tokenizer = real_load(
            loading.ModelSource.resolve(folders["v2"], None, False), None, dtype, device
        )
        return build_from_folder(folders["v1"]), tokenizer

    patch.setattr(gen, "check_environment", lambda checkpoint, device_type: None)
    patch.setattr(loading, "load_model", load_v1)
    found["v1"] = Sa2VASegmenter(folders["v1"], device="cpu")
    patch.undo()
    yield found


def encoder_calls(model: torch.nn.Module) -> dict[str, int]:
    """The fixture's own counters of its image-only sub-modules, at upstream's places."""
    vision = model.vision_model if hasattr(model, "vision_model") else model.model.model.visual
    return {"vision": vision.calls, "sam2": model.grounding_encoder.sam2_model.image_encoder.calls}


def calls_during(seg: Sa2VASegmenter, run: Any) -> tuple[Any, dict[str, int]]:
    before = encoder_calls(seg.model)
    counted = seg.image_work.counts()
    result = run()
    after, now = encoder_calls(seg.model), seg.image_work.counts()
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {k: now[k]["computed"] - counted[k]["computed"] for k in delta}
    return result, delta


def assert_same(got: list[Segmentation], want: list[Segmentation]) -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.mask, w.mask)
        assert g.prob is not None and w.prob is not None
        assert g.prob.tobytes() == w.prob.tobytes()
        assert (g.score, g.flags) == (w.score, w.flags)


@pytest.mark.parametrize("variant", ["v2", "qwen", "v1"])
def test_shared_path_runs_each_encoder_once_and_answers_bit_for_bit(
    segmenters: dict[str, Sa2VASegmenter], variant: str
) -> None:
    seg = segmenters[variant]
    image = np.random.default_rng(7).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    image[10:20] = 15
    seg.share_image_work = False
    per_prompt, plain_calls = calls_during(seg, lambda: [seg.segment(image, p) for p in PROMPTS])
    seg.share_image_work = True
    shared, shared_calls = calls_during(seg, lambda: seg.segment_prompts(image, PROMPTS))
    assert plain_calls == PER_PROMPT_CALLS and shared_calls == SHARED_CALLS
    assert_same(shared, per_prompt)
    assert [r.flags for r in shared] == [(), (FLAG_NO_SEG_TOKEN,), (FLAG_MULTIPLE_SEG_TOKENS,), ()]
    assert shared[0].mask[15].all() and not shared[1].mask.any()
    # The memo answered the other calls and kept nothing after the call.
    assert seg.image_work.kept("vision") is None and seg.image_work.kept("sam2") is None


def test_each_image_is_encoded_afresh(segmenters: dict[str, Sa2VASegmenter]) -> None:
    seg = segmenters["v2"]
    first, second = stripe_image(), 255 - stripe_image()
    got, calls = calls_during(
        seg, lambda: seg.segment_prompts(first, [PROMPT]) + seg.segment_prompts(second, [PROMPT])
    )
    assert calls == {"vision": 2, "sam2": 2}
    np.testing.assert_array_equal(got[0].mask, stripe_mask())
    np.testing.assert_array_equal(got[1].mask, ~stripe_mask())


def test_inside_one_block_other_inputs_recompute_and_equal_ones_reuse(
    segmenters: dict[str, Sa2VASegmenter],
) -> None:
    model = segmenters["v2"].model
    work = ImageWork(model)
    sam2 = model.grounding_encoder.sam2_model
    a, b = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    try:
        with torch.inference_mode(), work.shared():
            outputs = [sam2.forward_image(x) for x in (a, a.clone(), b, b.clone(), a)]
            kept = work.kept("sam2")
        assert work.counts()["sam2"] == {"computed": 3, "reused": 2}
        assert kept is not None and torch.equal(kept[0][0], a)
        first, again = outputs[0]["backbone_fpn"][0], outputs[1]["backbone_fpn"][0]
        assert again.data_ptr() == first.data_ptr()  # the same features, not recomputed
        assert outputs[1]["backbone_fpn"] is not outputs[0]["backbone_fpn"]  # fresh containers
        sam2.forward_image(a)
        assert work.counts()["sam2"]["computed"] == 4  # outside the block: nothing kept
    finally:
        work.remove()
    assert "forward_image" in vars(sam2)  # the segmenter's own wrapper is back in place


def test_blocks_nest_and_the_outer_one_keeps_the_work(
    segmenters: dict[str, Sa2VASegmenter],
) -> None:
    seg = segmenters["v2"]
    with seg.image_work.shared():
        _, calls = calls_during(
            seg, lambda: [seg.segment_prompts(stripe_image(), [p]) for p in (PROMPT, PROMPT)]
        )
        assert seg.image_work.kept("sam2") is not None
    assert calls == {"vision": 1, "sam2": 1} and seg.image_work.kept("sam2") is None


def test_calls_run_under_inference_mode(segmenters: dict[str, Sa2VASegmenter]) -> None:
    seg = segmenters["v2"]
    seg.segment(stripe_image(), PROMPT)
    (capture,) = seg._recorder.captures
    assert capture.logits.is_inference()


# --- bounded generation -------------------------------------------------------------------------
def test_max_new_tokens_cuts_and_flags_a_longer_answer(folders: dict[str, Path]) -> None:
    # Answers: "sure , [SEG] . </s>" (5 tokens), "it is an angiogram . </s>" (6),
    # "sure , [SEG] and [SEG] . </s>" (7). At 4 tokens each is cut; a [SEG] token is read out
    # only once fed back (upstream's get_seg_hidden_states), so the cut two-[SEG] answer has one.
    seg = Sa2VASegmenter(folders["v2"], device="cpu", max_new_tokens=4)
    assert ":tokens-4:" in seg.backend_id
    one, none, two = seg.segment_prompts(stripe_image(), [PROMPT, NO_SEG_PROMPT, TWO_SEG_PROMPT])
    assert seg.model.last_answer == "sure , [SEG] and"
    assert one.flags == (FLAG_ANSWER_TRUNCATED,)
    np.testing.assert_array_equal(one.mask, stripe_mask())
    assert none.flags == (FLAG_NO_SEG_TOKEN, FLAG_ANSWER_TRUNCATED) and not none.mask.any()
    assert two.flags == (FLAG_ANSWER_TRUNCATED,)
    seg.close()


def test_complete_answers_are_not_flagged(segmenters: dict[str, Sa2VASegmenter]) -> None:
    seg = segmenters["v2"]
    assert ":tokens-64:" in seg.backend_id
    seg.segment(stripe_image(), TWO_SEG_PROMPT)
    assert seg.model.last_answer == "sure , [SEG] and [SEG] . </s>"
    assert seg.model.gen_config.max_new_tokens == 2048  # upstream's own setting, overridden


def test_qwen_hard_coded_2048_is_overridden(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    processor = SimpleNamespace(tokenizer=object(), image_processor=object())
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: processor)
    seg = Sa2VASegmenter(folders["qwen"], device="cpu", max_new_tokens=3)
    result = seg.segment(stripe_image(), PROMPT)
    assert seg.model.last_answer == "sure , [SEG]"
    assert result.flags == (FLAG_NO_SEG_TOKEN, FLAG_ANSWER_TRUNCATED)
    seg.close()


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_bad_max_new_tokens_is_a_user_error(folders: dict[str, Path], bad: Any) -> None:
    from models.errors import UserError

    with pytest.raises(UserError, match="max_new_tokens must be a positive int"):
        Sa2VASegmenter(folders["v2"], device="cpu", max_new_tokens=bad)


def test_config_sets_max_new_tokens_for_the_workers(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    from test_sa2va_generations import run_config

    from models.errors import UserError
    from orchestrator import cluster

    config = run_config(folders["v2"], tmp_path, device="cpu", max_new_tokens=16)
    assert cluster.backend_spec(config)[1]["max_new_tokens"] == 16
    assert run_config(folders["v2"], tmp_path).backend.max_new_tokens == 64
    with pytest.raises(UserError, match="max_new_tokens"):
        run_config(folders["v2"], tmp_path, max_new_tokens=0)
