"""``Sa2VASegmenter``: one Sa2VA model answering ``segment(image, prompt)`` (see package doc)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.errors import UserError
from models.sa2va import loading
from models.sa2va.answer_limit import DEFAULT_MAX_NEW_TOKENS, FLAG_ANSWER_TRUNCATED, AnswerLimit
from models.sa2va.capture import (
    FLAG_MULTIPLE_SEG_TOKENS,
    FLAG_NO_SEG_TOKEN,
    FLAG_PROB_UNAVAILABLE,
    Capture,
    MaskLogitRecorder,
    hard_mask,
    soft_mask_or_reason,
    upscale_nearest,
)
from models.sa2va.devices import dtype_name, resolve_device, resolve_dtype, use_device
from models.sa2va.image_work import ImageWork
from models.sa2va.source import ModelSource, cached_commit, folder_digest
from models.segmentation import Segmentation

logger = logging.getLogger(__name__)

# The backend adds only the image token: prompts are full instructions ("Please segment the
# blood vessel.") and reach the model verbatim.
PROMPT_TEMPLATE = "<image>{prompt}"
PROMPT_TEMPLATE_VERSION = "v2"
# Bump when the post-processing (capture, resizing, union, reconciliation) changes outputs.
POSTPROCESS_VERSION = "1"


def format_prompt(prompt: str) -> str:
    """The text Sa2VA receives: ``"<image>" + prompt`` (stripped; left as it is when it already
    starts with ``<image>``)."""
    text = prompt.strip()
    if not text.removeprefix("<image>").strip(" .\n"):
        raise ValueError(f"prompt must name what to segment, got {prompt!r}")
    return text if text.startswith("<image>") else PROMPT_TEMPLATE.format(prompt=text)


class Sa2VASegmenter:
    """Segments with a Sa2VA checkpoint; satisfies the ``Segmenter`` protocol."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str | None = None,
        input_cap: int | None = None,
        processor: Any | None = None,
        allow_unpinned_remote_code: bool = False,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        share_image_work: bool = True,
    ) -> None:
        """Load the model, tokenizer (and processor for Qwen variants) onto ``device``.

        Args:
            model_path: a local model folder, or a Hub id such as ``"ByteDance/Sa2VA-4B"``.
            revision: the 40-hex commit to load a Hub id at; not allowed with a local folder.
            device: ``"auto"``/``"cuda"`` (the current CUDA device), ``"cuda:N"``, or ``"cpu"``
                (explicit only, slow, for debugging; see ``models.sa2va.devices``).
            dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``; default bfloat16 on CUDA,
                float32 on the CPU (half types are refused there).
            input_cap: longest image side passed to the model, ``None`` for no cap.
            processor: the processor of a Qwen-based variant; loaded with ``AutoProcessor``
                when omitted. Passed only to a ``predict_forward`` that takes ``processor``.
            allow_unpinned_remote_code: accept a Hub id without ``revision``.
            max_new_tokens: the most answer tokens the model may generate per prompt; a longer
                answer is cut and its result flagged ``"answer_truncated"``.
            share_image_work: within one :meth:`segment_prompts` call, compute the vision
                encoder's and SAM2's image features once for all prompts
                (:mod:`models.sa2va.image_work`); ``False`` recomputes them per prompt and per
                [SEG] token as upstream does. The answers are the same either way.

        Raises:
            UserError: missing folder, unpinned Hub id, remote code this environment cannot
                load (generation vs transformers, missing packages), no CUDA, bad dtype/cap, a
                Qwen variant without a usable processor, or a checkpoint that cannot be read.
        """
        self._source = ModelSource.resolve(model_path, revision, allow_unpinned_remote_code)
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self._input_cap = _check_cap(input_cap)
        self._max_new_tokens = _check_max_new_tokens(max_new_tokens)
        self._share = bool(share_image_work)
        checkpoint = loading.check_source(self._source, self._device.type)
        self._weights_id = self._source_digest()
        with use_device(self._device):
            model, self._tokenizer = loading.load_model(
                self._source, checkpoint, self._dtype, self._device
            )
            self._model = model.eval().to(self._device)
            loading.prepare_generation(self._model, self._tokenizer, self._dtype)
        self._processor = self._checked_processor(processor)
        if self._source.revision is None and not self._source.is_local:
            self._weights_id = cached_commit(self._source.location) or "unpinned"
        self._recorder = MaskLogitRecorder(self._model)
        self._image_work = ImageWork(self._model)
        self._limit = AnswerLimit(self._model, self._max_new_tokens, self._tokenizer.eos_token_id)
        if self._limit.unavailable_reason is not None:
            logger.warning("Sa2VA %s: %s", self._source.location, self._limit.unavailable_reason)
        self._lock = threading.Lock()
        self._closed = False
        self._logged: set[str] = set()

    @property
    def backend_id(self) -> str:
        """Changes whenever outputs could: source + weights, dtype, device type, versions,
        max_new_tokens, cap."""
        return (
            f"sa2va:{self._source.location}@{self._weights_id}:{dtype_name(self._dtype)}"
            f":{self._device.type}:prompt-{PROMPT_TEMPLATE_VERSION}:post-{POSTPROCESS_VERSION}"
            f":tokens-{self._max_new_tokens}"
            f":cap-{self._input_cap if self._input_cap is not None else 'none'}"
        )

    @property
    def source(self) -> ModelSource:
        """Where the weights were loaded from (a local folder, or a Hub id + commit)."""
        return self._source

    @property
    def device(self) -> torch.device:
        """The device the model runs on."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The parameter dtype the model runs in."""
        return self._dtype

    @property
    def model(self) -> torch.nn.Module:
        """The loaded Sa2VA model (diagnostics and tests; do not call it concurrently)."""
        return self._model

    @property
    def input_cap(self) -> int | None:
        """Longest image side passed to the model (``None`` = no cap); settable."""
        return self._input_cap

    @input_cap.setter
    def input_cap(self, cap: int | None) -> None:
        self._input_cap = _check_cap(cap)

    @property
    def share_image_work(self) -> bool:
        """Whether one :meth:`segment_prompts` call shares image-only work; settable."""
        return self._share

    @share_image_work.setter
    def share_image_work(self, share: bool) -> None:
        self._share = bool(share)

    @property
    def image_work(self) -> ImageWork:
        """The memos around the model's image-only functions (their ``counts()``)."""
        return self._image_work

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        """Segment what ``prompt`` names in ``image`` (uint8 HxWx3 RGB); one model call."""
        return self.segment_prompts(image, [prompt])[0]

    def segment_prompts(self, image: np.ndarray, prompts: Sequence[str]) -> list[Segmentation]:
        """``segment(image, p)`` for every prompt, in order, one ``predict_forward`` each; the
        image-only work is done once for all of them (see ``share_image_work``). Everything
        runs under ``torch.inference_mode()``."""
        _check_image(image)
        texts = [format_prompt(p) for p in prompts]
        model_image = _fit_to_cap(image, self._input_cap)
        pil_image = Image.fromarray(model_image)
        with self._lock:
            if self._closed:
                raise RuntimeError("Sa2VASegmenter called after close()")
            with use_device(self._device), torch.inference_mode(), self._sharing():
                answers = [self._predict(pil_image, text) for text in texts]
        return [
            self._result(output, captures, image.shape[:2], model_image.shape[:2], flags)
            for output, captures, flags in answers
        ]

    def _sharing(self) -> AbstractContextManager[Any]:
        return self._image_work.shared() if self._share else nullcontext()

    def _predict(
        self, image: Image.Image, text: str
    ) -> tuple[dict[str, Any], list[Capture], list[str]]:
        """One ``predict_forward`` (the caller holds the lock): output, captures, flags."""
        kwargs: dict[str, Any] = {"image": image, "text": text, "tokenizer": self._tokenizer}
        if self._processor is not None:
            kwargs["processor"] = self._processor
        self._recorder.reset()
        self._limit.truncated = False
        output = self._model.predict_forward(**kwargs)
        flags = [FLAG_ANSWER_TRUNCATED] if self._limit.truncated else []
        return output, list(self._recorder.captures), flags

    def close(self) -> None:
        """Remove the hooks and drop the model (frees GPU memory once nothing else holds it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._recorder.remove()
            self._image_work.remove()
            self._limit.remove()
            del self._model, self._tokenizer, self._processor
            if self._device.type == "cuda":
                torch.cuda.empty_cache()

    def _source_digest(self) -> str:
        if self._source.is_local:
            return folder_digest(Path(self._source.location))
        return self._source.revision or "unpinned"

    def _checked_processor(self, given: Any | None) -> Any | None:
        if not loading.accepts_processor(self._model):
            if given is not None:
                logger.warning(
                    "Sa2VA %s: predict_forward of %s takes no processor; ignoring processor=",
                    self._source.location, type(self._model).__name__,
                )  # fmt: skip
            return None
        if given is None and not loading.needs_processor(self._model):
            return None
        return loading.load_processor(self._source, given)

    def _result(
        self,
        output: dict[str, Any],
        captures: list[Capture],
        size: tuple[int, ...],
        model_size: tuple[int, ...],
        flags: list[str],
    ) -> Segmentation:
        full_size = (int(size[0]), int(size[1]))
        hard_masks = [hard_mask(m, model_size) for m in output.get("prediction_masks") or []]
        if not hard_masks:
            empty = np.zeros(full_size, dtype=bool)
            no_seg = (FLAG_NO_SEG_TOKEN, *flags)
            return Segmentation(empty, np.zeros(full_size, np.float32), None, no_seg)
        flags = [*flags, FLAG_MULTIPLE_SEG_TOKENS] if len(hard_masks) > 1 else flags
        score = captures[0].score if captures else None
        prob = self._soft_mask(captures, hard_masks, full_size)
        if prob is not None:
            return Segmentation(prob > 0.5, prob, score, tuple(flags))
        mask = upscale_nearest(np.logical_or.reduce(hard_masks), full_size)
        return Segmentation(mask, None, score, (*flags, FLAG_PROB_UNAVAILABLE))

    def _soft_mask(
        self, captures: list[Capture], hard_masks: list[np.ndarray], size: tuple[int, int]
    ) -> np.ndarray | None:
        prob_or_reason = soft_mask_or_reason(
            self._recorder.unavailable_reason, captures, hard_masks, size
        )
        if isinstance(prob_or_reason, np.ndarray):
            return prob_or_reason
        if prob_or_reason not in self._logged:
            self._logged.add(prob_or_reason)
            logger.warning("Sa2VA soft masks unavailable (prob=None): %s", prob_or_reason)
        return None


def _check_cap(cap: int | None) -> int | None:
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise UserError(f"Sa2VA input_cap must be a positive int or None, got {cap!r}")
    return cap


def _check_max_new_tokens(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"Sa2VA max_new_tokens must be a positive int, got {value!r}")
    return value


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 HxWx3 RGB, got {image.dtype} {image.shape}")


def _fit_to_cap(image: np.ndarray, cap: int | None) -> np.ndarray:
    height, width = image.shape[:2]
    if cap is None or max(height, width) <= cap:
        return image
    scale = cap / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
