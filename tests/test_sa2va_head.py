"""The Sa2VA head (``models.sa2va.head``) and its export (``models.sa2va.export``) on the tiny
Sa2VA fixtures, loaded through the real ``from_pretrained(trust_remote_code=True)`` path.

The fixtures' "segmentation" is image darkness; on the ramp image (brightness rising left to
right) a shift of the logits moves the mask's edge, so a training step visibly changes masks.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_sa2va_backend import NO_SEG_PROMPT, PROMPT, TWO_SEG_PROMPT, stripe_image, upscale2
from tiny_sa2va import write_tiny_sa2va
from transformers import AutoModel

from models.backends import make_head_backend
from models.errors import UserError
from models.heads import FrozenInputs, HeadBackend, MaskHead
from models.sa2va import V2_INTERNVL, Sa2VASegmenter, preflight
from models.sa2va.export import export_head
from models.sa2va.head import NO_SEG_LOGIT, Sa2VAHead, Sa2VAHeadBackend
from models.sa2va.head_inputs import HeadInputRecorder, pack_decoder_call, unpack_decoder_call

PROMPTS = (PROMPT, TWO_SEG_PROMPT, NO_SEG_PROMPT)
DECODER = "grounding_encoder.sam2_model.sam_mask_decoder"
# The Qwen variant asserts a processor; the tiny model only checks that one is passed.
QWEN_PROCESSOR = SimpleNamespace(tokenizer=object(), image_processor=object())
SAM = 256  # SAM2's square input side in the fixtures (1024 in Sa2VA): keeps the tests quick


def ramp_image() -> np.ndarray:
    """40x60 grey ramp, 20 (left) to 235 (right)."""
    ramp = np.linspace(20, 235, 60).astype(np.uint8)
    return np.repeat(np.repeat(ramp[None, :, None], 40, axis=0), 3, axis=2)


def soft(head: Sa2VAHead, inputs: FrozenInputs) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(head(inputs)).numpy()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("head_models")


@pytest.fixture(scope="module")
def v2(models: Path) -> Sa2VAHeadBackend:
    folder = write_tiny_sa2va(models / "tiny_sa2va_v2", sam_size=SAM)
    return Sa2VAHeadBackend(Sa2VASegmenter(folder, device="cpu"))


@pytest.fixture(scope="module")
def trained(v2: Sa2VAHeadBackend) -> tuple[Sa2VAHead, list[FrozenInputs]]:
    """A head after 3 Adam steps that raise the vessel probability (the mask edge moves)."""
    inputs = v2.frozen_inputs(ramp_image(), PROMPTS) + v2.frozen_inputs(stripe_image(), PROMPTS)
    head = v2.initial_head().train()
    optimiser = torch.optim.Adam(head.parameters(), lr=0.1)
    for _ in range(3):
        loss = -torch.stack([torch.sigmoid(head(x)).mean() for x in inputs[:2]]).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return head, inputs


@pytest.mark.parametrize("variant", ["v2", "qwen"])
def test_initial_head_is_the_backend_soft_mask_exactly(
    variant: str, v2: Sa2VAHeadBackend, models: Path
) -> None:
    if variant == "v2":
        backend = v2
    else:
        folder = write_tiny_sa2va(models / "tiny_sa2va_qwen", variant="qwen", sam_size=SAM)
        seg = Sa2VASegmenter(folder, device="cpu", processor=QWEN_PROCESSOR)
        backend = Sa2VAHeadBackend(seg)
    assert isinstance(backend, HeadBackend)
    image = ramp_image()
    before = backend.segmenter.image_work.counts()
    inputs = backend.frozen_inputs(image, PROMPTS)
    after = backend.segmenter.image_work.counts()
    # Image-only work ran once for the three prompts (and the three [SEG] tokens).
    assert {s: after[s]["computed"] - before[s]["computed"] for s in after} == dict.fromkeys(
        after, 1
    )
    head = backend.initial_head()
    assert isinstance(head, MaskHead)
    for x in inputs:
        answer = backend.segmenter.segment(image, x.prompt)
        assert answer.prob is not None
        np.testing.assert_array_equal(soft(head, x), answer.prob)  # float32 CPU: bit for bit
        np.testing.assert_array_equal(x.tensors["prob"].numpy(), answer.prob)
        mine = backend.segmentation(soft(head, x), x)
        assert mine.flags == answer.flags and np.array_equal(mine.mask, answer.mask)
        assert x.size == (40, 60) and x.meta["mask_disagreement"] == 0.0
        for tensor in x.tensors.values():
            assert tensor.device.type == "cpu" and tensor.dtype == torch.float32
            assert not tensor.requires_grad
    assert [x.meta["seg_tokens"] for x in inputs] == [1, 2, 0]
    # SAM2's image-side tensors are recorded once and shared by every prompt of the image.
    shared = "decoder.image_embeddings"
    assert inputs[0].tensors[shared] is inputs[1].tensors[shared]
    assert inputs[0].tensors["seg_hidden"].shape == (1, 8)
    assert inputs[1].tensors["seg_hidden"].shape == (2, 8)


def test_the_backend_registry_gives_the_head_backend_of_a_loaded_sa2va(
    v2: Sa2VAHeadBackend,
) -> None:
    found = make_head_backend(v2.segmenter)
    assert isinstance(found, Sa2VAHeadBackend) and found.backend_id == v2.backend_id
    assert make_head_backend(found) is found
    client = SimpleNamespace(backend_id=v2.backend_id)  # e.g. a client of the workers
    with pytest.raises(UserError, match="a Sa2VA checkpoint loaded in this process"):
        make_head_backend(client)  # type: ignore[arg-type]


def test_input_cap_keeps_the_head_exact_at_the_original_size(v2: Sa2VAHeadBackend) -> None:
    big = upscale2(ramp_image())  # 80x120, the model sees 40x60
    v2.segmenter.input_cap = 60
    try:
        (x,) = v2.frozen_inputs(big, [PROMPT])
        expected = v2.segmenter.segment(big, PROMPT).prob
    finally:
        v2.segmenter.input_cap = None
    assert x.size == (80, 120)
    np.testing.assert_array_equal(soft(v2.initial_head(), x), expected)


def test_answer_without_seg_is_a_constant_empty_mask(v2: Sa2VAHeadBackend) -> None:
    (x,) = v2.frozen_inputs(ramp_image(), [NO_SEG_PROMPT])
    assert x.meta["seg_tokens"] == 0 and set(x.tensors) == {"prob"}
    logits = v2.initial_head().batch_logits([x, x])[1]
    assert not logits.requires_grad  # nothing to train: the LLM chose not to segment
    assert torch.equal(logits, torch.full((40, 60), NO_SEG_LOGIT))
    assert torch.sigmoid(logits).max().item() == 0.0


def test_a_gradient_step_changes_logits_through_the_chosen_mask_only(
    v2: Sa2VAHeadBackend, trained: tuple[Sa2VAHead, list[FrozenInputs]]
) -> None:
    head, inputs = trained
    # Image-independent decoder inputs are one object across images; image features are not.
    ramp, stripe = inputs[0].tensors, inputs[3].tensors
    assert ramp["decoder.sparse_prefix"] is stripe["decoder.sparse_prefix"]
    assert not torch.equal(ramp["decoder.image_embeddings"], stripe["decoder.image_embeddings"])
    start = v2.initial_head()
    assert not np.array_equal(soft(head, inputs[0]) > 0.5, soft(start, inputs[0]) > 0.5)
    assert (soft(head, inputs[0]) > soft(start, inputs[0])).mean() > 0.9
    for name, parameter in head.named_parameters():
        # The candidate is chosen under no_grad: SAM2's IoU head is never trained.
        assert (parameter.grad is None) == ("iou_prediction_head" in name), name
    # The model the frozen inputs come from is untouched.
    own = v2.segmenter.model.state_dict()[f"{DECODER}.conv.weight"]
    assert torch.equal(own, start.sam_mask_decoder.state_dict()["conv.weight"])


def test_a_model_that_post_processes_the_logits_is_refused(models: Path) -> None:
    folder = write_tiny_sa2va(models / "tiny_sa2va_v2_bias", post_capture_bias=3.0, sam_size=SAM)
    backend = Sa2VAHeadBackend(Sa2VASegmenter(folder, device="cpu"))
    with pytest.raises(RuntimeError, match=r"disagrees with the model's own mask on \d+\.\d% of"):
        backend.frozen_inputs(ramp_image(), [PROMPT])


def test_export_loads_upstream_and_gives_the_head_masks(
    v2: Sa2VAHeadBackend, trained: tuple[Sa2VAHead, list[FrozenInputs]], models: Path
) -> None:
    head, inputs = trained
    out = v2.export(head, models / "tiny_sa2va_v2_tuned", {"steps": 3, "reward_net": "rn"})
    base = Path(v2.segmenter.source.location)
    for name in ("config.json", "modeling_sa2va_chat.py", "sam2.py", "vocab.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()

    model = AutoModel.from_pretrained(out, trust_remote_code=True, local_files_only=True)
    loaded, original = model.state_dict(), v2.segmenter.model.state_dict()
    tuned = {f"text_hidden_fcs.{k}": v for k, v in head.text_hidden_fcs.state_dict().items()}
    tuned |= {f"{DECODER}.{k}": v for k, v in head.sam_mask_decoder.state_dict().items()}
    assert set(loaded) == set(original)
    for key, value in loaded.items():
        assert torch.equal(value, tuned.get(key, original[key])), key
    assert not torch.equal(loaded["text_hidden_fcs.weight"], original["text_hidden_fcs.weight"])

    checked = preflight(out, device="cpu")  # what --model-path runs before any worker starts
    assert checked is not None and checked.generation is V2_INTERNVL
    tuned_seg = Sa2VASegmenter(out, device="cpu")
    assert tuned_seg.backend_id != v2.backend_id
    for x, image in zip(inputs, [ramp_image()] * 3 + [stripe_image()] * 3, strict=True):
        mask = tuned_seg.segment(image, x.prompt).mask
        np.testing.assert_array_equal(mask, soft(head, x) > 0.5)

    record = json.loads((out / "provenance.json").read_text())
    assert record["training"] == {"steps": 3, "reward_net": "rn"}
    assert record["base"]["backend_id"] == v2.backend_id
    assert record["base"]["weight_files"] == {
        "model.safetensors": (base / "model.safetensors").stat().st_size
    }
    assert len(record["head"]["keys"]) == 6 and len(record["head"]["sha256"]) == 64


def test_export_of_a_sharded_checkpoint_copies_untouched_shards(
    models: Path, trained: tuple[Sa2VAHead, list[FrozenInputs]]
) -> None:
    folder = write_tiny_sa2va(models / "tiny_sa2va_v2_sharded", sam_size=SAM)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        tensors = {k: weights.get_tensor(k) for k in weights.keys()}  # noqa: SIM118
    first = {k: v for k, v in tensors.items() if k.startswith("embed_tokens")}
    second = {k: v for k, v in tensors.items() if k not in first}
    save_file(first, str(folder / "model-00001-of-00002.safetensors"), {"format": "pt"})
    save_file(second, str(folder / "model-00002-of-00002.safetensors"), {"format": "pt"})
    weight_map = {k: f"model-0000{1 if k in first else 2}-of-00002.safetensors" for k in tensors}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    backend = Sa2VAHeadBackend(Sa2VASegmenter(folder, device="cpu"))

    head = backend.initial_head()  # the sharded folder's head, with the trained weights
    head.load_state_dict(trained[0].state_dict())
    inputs = trained[1]
    out = backend.export(head, models / "tiny_sa2va_v2_sharded_tuned", {"steps": 3})
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    assert not (out / "model.safetensors").exists()
    with safe_open(str(out / "model-00002-of-00002.safetensors"), framework="pt") as weights:
        assert weights.metadata() == {"format": "pt"}
        written = weights.get_tensor("text_hidden_fcs.weight")
    assert torch.equal(written, head.text_hidden_fcs.state_dict()["weight"])
    np.testing.assert_array_equal(
        Sa2VASegmenter(out, device="cpu").segment(ramp_image(), PROMPT).mask,
        soft(head, inputs[0]) > 0.5,
    )


def test_export_replaces_a_previous_export_but_nothing_else(
    v2: Sa2VAHeadBackend, trained: tuple[Sa2VAHead, list[FrozenInputs]], tmp_path: Path
) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="holds something other than a previous export"):
        v2.export(trained[0], tmp_path, {"steps": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    out = tmp_path / "tuned"
    v2.export(v2.initial_head(), out, {"steps": 0})
    # A re-run of the same trial, exporting as a trial would: from the head alone.
    export_head(trained[0], out, {"steps": 3}, v2.backend_id)
    assert json.loads((out / "provenance.json").read_text())["training"] == {"steps": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "tuned"]


class RealSignatureDecoder(torch.nn.Module):
    """A decoder called like SAM2's ``MaskDecoder`` in Sa2VA: image-side tensors, a list of
    high-resolution features, flags, and sparse embeddings whose last token is the [SEG] one."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert high_res_features is not None and multimask_output and not repeat_image
        base = image_embeddings + image_pe + dense_prompt_embeddings + high_res_features[1]
        masks = self.scale * base * sparse_prompt_embeddings.sum() + high_res_features[0]
        return masks, masks.mean(dim=(2, 3))


class RealSignatureModel(torch.nn.Module):
    """Calls ``text_hidden_fcs`` and the decoder per ``predict_forward`` as Sa2VA does."""

    def __init__(self) -> None:
        super().__init__()
        self.text_hidden_fcs = torch.nn.Linear(4, 3)
        self.decoder = RealSignatureDecoder()
        self.padding = torch.rand(1, 2, 3)
        self.image = {
            "image_embeddings": torch.rand(1, 3, 4, 4),
            "image_pe": torch.rand(1, 3, 4, 4),
            "dense_prompt_embeddings": torch.rand(1, 3, 1, 1).expand(1, 3, 4, 4),
            "high_res_features": [torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4)],
        }

    def predict_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        language = self.text_hidden_fcs(hidden)
        sparse = torch.cat([self.padding, language[:1, None]], dim=1)
        return self.decoder(sparse_prompt_embeddings=sparse, multimask_output=True,
                            repeat_image=False, **self.image)[0]  # fmt: skip


def test_recorded_decoder_call_replays_exactly_and_ignores_other_threads() -> None:
    model = RealSignatureModel()
    recorder = HeadInputRecorder(model, model.text_hidden_fcs, model.decoder)
    other_hidden = torch.rand(5, 4)
    with torch.inference_mode(), recorder.recording() as recordings:
        other = threading.Thread(target=model.predict_forward, args=(other_hidden,))
        other.start()
        other.join()
        expected = [model.predict_forward(torch.rand(1, 4)) for _ in range(2)]
    assert len(recordings) == 2  # one per predict_forward of this thread
    for recording, output in zip(recordings, expected, strict=True):
        assert recording.fcs_calls == 1 and len(recording.decoder_calls) == 1
        assert recording.seg_hidden is not None and recording.language is not None
        tensors, meta = pack_decoder_call(recording.decoder_calls[0], recording.language[0])
        assert meta == {
            "decoder_values": {"multimask_output": True, "repeat_image": False},
            "decoder_lists": {"high_res_features": 2},
        }
        assert torch.equal(tensors["decoder.sparse_prefix"], model.padding)
        assert not any(t.is_inference() for t in tensors.values())  # usable by autograd
        language = model.text_hidden_fcs(recording.seg_hidden)[0]
        kwargs = unpack_decoder_call(tensors, meta, language, torch.device("cpu"))
        assert torch.equal(model.decoder(**kwargs)[0], output)
    # Outside a recording the hooks and the wrapper are gone.
    assert "predict_forward" not in vars(model)
    assert not model.text_hidden_fcs._forward_hooks and not model.decoder._forward_pre_hooks


def test_a_pickled_head_unpickles_in_a_fresh_process(
    trained: tuple[Sa2VAHead, list[FrozenInputs]], tmp_path: Path
) -> None:
    # A Ray trial receives the head from a worker: its remote-code classes must be importable.
    head, inputs = trained
    (tmp_path / "head.pkl").write_bytes(pickle.dumps((head, inputs[0])))
    script = (
        "import pickle, sys, torch; "
        "head, x = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "assert type(head.sam_mask_decoder).__module__.startswith('transformers_modules.'); "
        "torch.save(head(x).detach(), sys.argv[2])"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    args = [sys.executable, "-c", script, str(tmp_path / "head.pkl"), str(tmp_path / "out.pt")]
    subprocess.run(args, check=True, env=env, cwd=tmp_path, timeout=300)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), head(inputs[0]))
