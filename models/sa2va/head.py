"""Sa2VA's trainable mask head (``text_hidden_fcs`` + SAM2's ``sam_mask_decoder``) and the
:class:`models.heads.HeadBackend` that feeds it.

Usage::

    backend = Sa2VAHeadBackend(Sa2VASegmenter(folder, device="cuda:0"))
    inputs = backend.frozen_inputs(image, ["Please segment the blood vessel."])
    head = backend.initial_head()
    torch.sigmoid(head(inputs[0]))  # == backend.segmenter.segment(image, prompt).prob at start
    backend.export(head, out_folder, {"steps": 200, ...})

What a caller may rely on:

- **Frozen inputs** (names in :class:`Sa2VAHead`) come from the model's own ``predict_forward``
  (one ``segment_prompts`` call per image, so the vision encoder and SAM2's image encoder run
  once per image; hooks only, see ``head_inputs``). SAM2's image-side tensors are kept from the
  first prompt with a ``[SEG]`` token and the same tensor objects are shared by every prompt of
  the image (held and pickled once); those equal to the previous image's (the image-independent
  ones) are that image's objects. Each input is checked against the model's
  own mask: the head at initialisation must agree with it on all but 1% of the pixels (float32
  on the CPU: exactly), else ``RuntimeError``. ``meta``: ``seg_tokens`` (0 when the answer has no
  ``[SEG]``), ``mask_disagreement`` (that check's share of pixels), the decoder call's facts.
- **The head** is float32 copies of the model's ``text_hidden_fcs`` and ``sam_mask_decoder``
  (on the CPU; move it with ``.to``). Its forward replays the decoder call with the language
  embedding recomputed from the ``[SEG]`` hidden state, keeps the candidate mask with the highest
  predicted IoU (chosen under ``no_grad``: the IoU head gets no gradient, the gradient flows
  through the chosen mask's logits), upsamples as SAM2 and ``predict_forward`` do (bilinear to
  SAM2's image size, then to the image size) and takes the maximum over ``[SEG]`` tokens (the
  backend's union of masks). ``conv_s0``/``conv_s1`` (inside the decoder) are frozen: SAM2
  applies them to the image features, which are frozen inputs here.
- **No [SEG] token**: the logits are the constant :data:`NO_SEG_LOGIT` (sigmoid exactly 0, the
  backend's all-zero ``prob``) and do not depend on the head's parameters (no gradient); a
  trainer should skip such inputs (``meta["seg_tokens"] == 0``).
- **Pickling** (Ray objects): the head's modules are instances of the checkpoint's remote-code
  classes (``transformers_modules.<folder>...``), which a fresh process cannot import. A pickled
  head therefore names the model's source and class; unpickling imports that remote code first
  (as the segmenter's loader does, :mod:`models.sa2va.remote_code`) when the classes are not
  importable yet, so the model must be readable where the head is unpickled (as it must be for
  the export).
- **Precision**: the head computes in float32. On a bfloat16 model on CUDA the head's masks
  differ from the model's near the 0.5 boundary (checked: at most 1% of pixels); the export casts
  the trained weights back to the checkpoint's dtype.
"""

from __future__ import annotations

import copy
import pickle
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.errors import UserError
from models.heads import FrozenInputs, reuse_equal
from models.sa2va import remote_code
from models.sa2va.capture import FLAG_MULTIPLE_SEG_TOKENS, FLAG_NO_SEG_TOKEN
from models.sa2va.head_inputs import HeadInputRecorder, Recording, pack_decoder_call
from models.sa2va.head_inputs import unpack_decoder_call as _decoder_kwargs
from models.sa2va.segmenter import Sa2VASegmenter
from models.sa2va.source import ModelSource
from models.segmentation import Segmentation

SEG_HIDDEN = "seg_hidden"
# sigmoid(-1e4) is exactly 0.0 in float32, and the value stays finite in losses.
NO_SEG_LOGIT = -1e4
# Share of pixels where the head at initialisation may disagree with the model's own mask
# (float32 head vs the model's bfloat16 on CUDA flips only pixels whose logit is about 0).
MAX_MASK_DISAGREEMENT = 0.01
# Decoder parts SAM2 applies to the image features (``forward_image``), not to the prompt.
_IMAGE_SIDE = ("conv_s0", "conv_s1")


class Sa2VAHead(nn.Module):
    """``head(inputs)`` -> float32 mask logits of shape ``inputs.size``.

    Inputs (``FrozenInputs.tensors``): ``prob``, float32 ``(H, W)``, the initial head's soft
    mask (fine-tuning's start, e.g. for a KL term); ``seg_hidden`` ``(tokens, hidden)``, the
    last-layer hidden state at each ``[SEG]`` token, and ``decoder.*``, SAM2's image-side decoder
    arguments (these two absent without ``[SEG]``).

    Attributes:
        checkpoint_prefixes: this module's state-dict prefixes -> the checkpoint's (what
            :mod:`models.sa2va.export` writes back).
        sam_size: side of SAM2's square input (its logits are upsampled to it first).
        code: (the model's source, ``"module.Class"`` of the model): where the modules' classes
            come from, for unpickling in another process.
    """

    def __init__(
        self,
        text_hidden_fcs: nn.Module,
        sam_mask_decoder: nn.Module,
        checkpoint_prefixes: Mapping[str, str],
        sam_size: int,
        code: tuple[ModelSource, str],
    ) -> None:
        super().__init__()
        self.code = code
        self.text_hidden_fcs = _trainable_copy(text_hidden_fcs)
        self.sam_mask_decoder = _trainable_copy(sam_mask_decoder)
        for name in _IMAGE_SIDE:
            part = getattr(self.sam_mask_decoder, name, None)
            if isinstance(part, nn.Module):
                part.requires_grad_(False)
        self.checkpoint_prefixes = dict(checkpoint_prefixes)
        self.sam_size = sam_size
        self.eval()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        modules = pickle.dumps((self.text_hidden_fcs, self.sam_mask_decoder))
        return _unpickle_head, (modules, self.checkpoint_prefixes, self.sam_size, self.code)

    def train(self, mode: bool = True) -> Sa2VAHead:
        """The copied modules stay in eval mode: the head computes the same in both modes."""
        super().train(mode)
        self.text_hidden_fcs.eval()
        self.sam_mask_decoder.eval()
        return self

    def forward(self, inputs: FrozenInputs) -> torch.Tensor:
        device = next(self.parameters()).device
        if int(inputs.meta["seg_tokens"]) == 0:
            return torch.full(inputs.size, NO_SEG_LOGIT, dtype=torch.float32, device=device)
        hidden = inputs.tensors[SEG_HIDDEN].to(device, torch.float32)
        language = self.text_hidden_fcs(hidden)
        per_token = [self._token_logits(inputs, embedding, device) for embedding in language]
        return torch.stack(per_token).amax(dim=0)

    def batch_logits(self, batch: Sequence[FrozenInputs]) -> torch.Tensor:
        """``(N, H, W)`` logits of equally sized inputs (one decoder call per [SEG] token)."""
        return torch.stack([self(inputs) for inputs in batch])

    def segmentation(self, prob: np.ndarray, inputs: FrozenInputs) -> Segmentation:
        """:func:`head_segmentation`."""
        return head_segmentation(prob, inputs)

    def export(self, folder: Path, provenance: Mapping[str, Any], base_backend_id: str) -> Path:
        """The checkpoint this head comes from, with its weights, in ``folder``
        (:func:`models.sa2va.export.export_head`)."""
        from models.sa2va.export import export_head

        return export_head(self, Path(folder), provenance, base_backend_id)

    def _token_logits(
        self, inputs: FrozenInputs, embedding: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        kwargs = _decoder_kwargs(inputs.tensors, inputs.meta, embedding, device)
        masks, ious = self.sam_mask_decoder(**kwargs)[:2]
        with torch.no_grad():
            best = int(ious[0].argmax())
        chosen = masks[:, best : best + 1].float()
        at_sam = _bilinear(chosen, (self.sam_size, self.sam_size))
        return _bilinear(at_sam, inputs.size)[0, 0]


class Sa2VAHeadBackend:
    """:class:`models.heads.HeadBackend` for a loaded :class:`Sa2VASegmenter`."""

    def __init__(self, segmenter: Sa2VASegmenter) -> None:
        """Raises ``UserError`` when the model lacks ``text_hidden_fcs`` or
        ``grounding_encoder.sam2_model.sam_mask_decoder``."""
        self._segmenter = segmenter
        model = segmenter.model
        sam2 = getattr(getattr(model, "grounding_encoder", None), "sam2_model", None)
        fcs = getattr(model, "text_hidden_fcs", None)
        decoder = getattr(sam2, "sam_mask_decoder", None)
        if not isinstance(fcs, nn.Module) or not isinstance(decoder, nn.Module):
            raise UserError(
                f"Sa2VA {segmenter.source.describe()}: {type(model).__name__} has no "
                "text_hidden_fcs and grounding_encoder.sam2_model.sam_mask_decoder, the modules "
                "fine-tuning trains; this checkpoint's code cannot be fine-tuned here"
            )
        self._fcs, self._decoder = fcs, decoder
        self._sam_size = int(getattr(sam2, "image_size", 1024))
        self._recorder = HeadInputRecorder(model, fcs, decoder)
        self._reference: Sa2VAHead | None = None
        self._previous: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()  # one recording at a time

    @property
    def backend_id(self) -> str:
        """The segmenter's: frozen inputs and initial heads follow its weights and settings."""
        return self._segmenter.backend_id

    @property
    def segmenter(self) -> Sa2VASegmenter:
        """The wrapped segmenter (its ``segment`` gives the masks the head starts from)."""
        return self._segmenter

    def frozen_inputs(self, image: np.ndarray, prompts: Sequence[str]) -> list[FrozenInputs]:
        """One :class:`FrozenInputs` per prompt (module doc); ``image`` is uint8 HxWx3 RGB.
        Thread-safe: calls are serialised, and other threads may segment meanwhile."""
        with self._lock:
            return self._frozen_inputs(image, prompts)

    def _frozen_inputs(self, image: np.ndarray, prompts: Sequence[str]) -> list[FrozenInputs]:
        size = (int(image.shape[0]), int(image.shape[1]))
        with self._recorder.recording() as recordings:
            answers = self._segmenter.segment_prompts(image, prompts)
        if len(recordings) != len(answers):
            raise RuntimeError(
                f"{len(recordings)} predict_forward calls for {len(answers)} prompts; the "
                "segmenter no longer calls the model once per prompt"
            )
        shared: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        result = []
        for prompt, answer, recording in zip(prompts, answers, recordings, strict=True):
            tokens = 0 if FLAG_NO_SEG_TOKEN in answer.flags else _seg_tokens(recording)
            tensors: dict[str, torch.Tensor] = {}
            meta: dict[str, Any] = {"seg_tokens": tokens}
            if tokens:
                assert recording.seg_hidden is not None and recording.language is not None
                if shared is None:
                    shared = pack_decoder_call(recording.decoder_calls[0], recording.language[0])
                    shared = (self._reuse_equal(shared[0]), shared[1])
                tensors = {SEG_HIDDEN: recording.seg_hidden, **shared[0]}
                meta.update(shared[1])
            prob, share = self._initial_prob(FrozenInputs(prompt, size, tensors, meta), answer.mask)
            tensors["prob"] = prob
            result.append(FrozenInputs(prompt, size, tensors, {**meta, "mask_disagreement": share}))
        return result

    def initial_head(self) -> Sa2VAHead:
        """Fresh float32 copies of the model's ``text_hidden_fcs`` and ``sam_mask_decoder``."""
        model = self._segmenter.model
        names = {id(m): n for n, m in model.named_modules()}
        prefixes = {
            "text_hidden_fcs": names[id(self._fcs)],
            "sam_mask_decoder": names[id(self._decoder)],
        }
        model_class = f"{type(model).__module__.rpartition('.')[2]}.{type(model).__name__}"
        code = (self._segmenter.source, model_class)
        return Sa2VAHead(self._fcs, self._decoder, prefixes, self._sam_size, code)

    def export(self, head: Any, folder: Path, provenance: Mapping[str, Any]) -> Path:
        """A model folder with ``head``'s weights (see :func:`models.sa2va.export.export_head`)."""
        if not isinstance(head, Sa2VAHead):
            raise TypeError(f"expected a Sa2VAHead, got {type(head).__name__}")
        return head.export(folder, provenance, self.backend_id)

    def _reuse_equal(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:func:`models.heads.reuse_equal` against the previous image's tensors."""
        self._previous = reuse_equal(tensors, self._previous)
        return self._previous

    def segmentation(self, prob: np.ndarray, inputs: FrozenInputs) -> Segmentation:
        """:func:`head_segmentation`."""
        return head_segmentation(prob, inputs)

    def _initial_prob(self, inputs: FrozenInputs, mask: np.ndarray) -> tuple[torch.Tensor, float]:
        """The initial head's soft mask, and the share of pixels where its threshold differs
        from the model's own ``mask`` (``RuntimeError`` above :data:`MAX_MASK_DISAGREEMENT`)."""
        if self._reference is None:
            self._reference = self.initial_head().to(self._segmenter.device)
        with torch.no_grad():
            prob = torch.sigmoid(self._reference(inputs)).cpu()
        share = float(np.count_nonzero((prob > 0.5).numpy() != mask) / mask.size)
        if share > MAX_MASK_DISAGREEMENT:
            raise RuntimeError(
                f"the Sa2VA head replaying the model's decoder call disagrees with the model's "
                f"own mask on {share:.1%} of the pixels for prompt {inputs.prompt!r}; this "
                "model's code post-processes SAM2's logits in a way the head does not reproduce"
            )
        return prob, share


def head_segmentation(prob: np.ndarray, inputs: FrozenInputs) -> Segmentation:
    """The backend's rule for the head's soft mask ``prob`` (float32 HxW): ``prob > 0.5``, no
    score, the backend's ``[SEG]`` flags. ``sigmoid(head) > 0.5`` is what the exported model's
    ``segment`` gives."""
    tokens = int(inputs.meta["seg_tokens"])
    flags: tuple[str, ...] = (FLAG_NO_SEG_TOKEN,) if tokens == 0 else ()
    flags += (FLAG_MULTIPLE_SEG_TOKENS,) if tokens > 1 else ()
    return Segmentation(prob > 0.5, prob.astype(np.float32), None, flags)


def model_folder(source: ModelSource) -> Path:
    """The local folder of a model source (for a Hub id: its cached snapshot)."""
    if source.is_local:
        return Path(source.location)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source.location, revision=source.revision, local_files_only=True))


def _unpickle_head(
    modules: bytes, prefixes: Mapping[str, str], sam_size: int, code: tuple[ModelSource, str]
) -> Sa2VAHead:
    try:
        fcs, decoder = pickle.loads(modules)
    except ModuleNotFoundError:
        _import_remote_code(*code)
        fcs, decoder = pickle.loads(modules)
    return Sa2VAHead(fcs, decoder, prefixes, sam_size, code)


def _import_remote_code(source: ModelSource, model_class: str) -> None:
    """Import the checkpoint's remote code as the segmenter's loader does (same module name,
    under the same inter-process lock)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    location = remote_code.code_location(source)
    with remote_code.code_lock(location):
        get_class_from_dynamic_module(model_class, location, **source.load_kwargs())


def _bilinear(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # The resize SAM2 (low-res masks -> its image size) and predict_forward (-> the image) use.
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _seg_tokens(recording: Recording) -> int:
    if recording.fcs_calls != 1 or recording.seg_hidden is None:
        raise RuntimeError(
            f"text_hidden_fcs ran {recording.fcs_calls} times in one predict_forward call "
            "(expected once, on all [SEG] hidden states); cannot tell the [SEG] inputs apart"
        )
    tokens = int(recording.seg_hidden.shape[0])
    if len(recording.decoder_calls) < tokens:
        raise RuntimeError(
            f"sam_mask_decoder ran {len(recording.decoder_calls)} times for {tokens} [SEG] "
            "tokens; the model no longer decodes each [SEG] token with SAM2"
        )
    return tokens


def _trainable_copy(module: nn.Module) -> nn.Module:
    """A float32 CPU deep copy without the original's hooks, every parameter trainable."""
    # Seeding deepcopy's memo with empty dicts for the forward/backward hook registries leaves
    # the hooks (and the objects they hold, e.g. the segmenter's recorder) out of the copy.
    memo: dict[int, Any] = {
        id(value): type(value)()
        for part in module.modules()
        for name, value in vars(part).items()
        if name.startswith(("_forward_", "_backward_")) and isinstance(value, dict)
    }
    twin = copy.deepcopy(module, memo).to("cpu", torch.float32)
    twin.requires_grad_(True)
    return twin
