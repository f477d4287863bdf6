"""The Sa2VA segmentation backend: ByteDance Sa2VA run through its own Hugging Face remote code.

Usage::

    seg = Sa2VASegmenter("/models/Sa2VA-4B", device="cuda:0")
    result = seg.segment(image_rgb_uint8, "segment the blood vessel")
    result.mask, result.prob, result.score, result.flags

What a caller needs to know:

- **Models.** The InternVL2.5-based checkpoints (Sa2VA-1B/4B/8B/26B and fine-tunes of them) work
  as they are. Qwen-based variants (class name containing ``Qwen``) also need an
  ``AutoProcessor``: it is loaded from the same source automatically, or pass ``processor=``.
- **Safe loading.** Sa2VA runs its own Python code (``trust_remote_code=True``). A local model
  folder is loaded offline (``local_files_only=True``). A Hub id is only accepted with a pinned
  40-hex commit ``revision``; an unpinned Hub id is refused unless
  ``allow_unpinned_remote_code=True``, because it would run whatever code the repository holds
  on the day of loading.
- **One image per call.** Sa2VA has no batch inference and ``predict_forward`` mutates model
  state, so calls on one instance are serialised on a lock; run one instance per GPU.
- **Prompt.** ``prompt`` is an instruction such as ``"segment the blood vessel"``; the model sees
  ``"<image>Please segment the blood vessel."`` (the model card's phrasing). The template has a
  version (``PROMPT_TEMPLATE_VERSION``) that is part of ``backend_id``.
- **Soft masks.** Sa2VA thresholds ``sigmoid(logits) > 0.5`` inside ``predict_forward``. This
  backend wraps ``model.grounding_encoder.language_embd_inference`` (the SAM2 call that returns
  the mask logits, shape ``(frames, 1, 1024, 1024)`` in the real model) to keep those logits, and
  resizes them bilinearly to the image size exactly as the model does: ``prob`` is their sigmoid
  (float32) and ``mask == (prob > 0.5)``. The capture is checked against the model's own mask;
  where it cannot be made (another model layout) or does not match, ``prob`` is ``None`` and
  ``flags`` holds ``"prob_unavailable"`` (logged once per reason).
- **Score.** A forward hook on ``grounding_encoder.sam2_model.sam_mask_decoder`` (SAM2's mask
  decoder) reads its predicted IoU, the mask-quality estimate Sa2VA otherwise throws away.
- **No [SEG].** When the answer has no ``[SEG]`` token the model returns no mask: the result is
  an empty mask, an all-zero ``prob``, ``score=None`` and flag ``"no_seg_token"``.
  Several [SEG] tokens give the union of their masks (flag ``"multiple_seg_tokens"``), the
  element-wise maximum of their probabilities, and the first mask's score.
- **Input cap.** ``input_cap`` (``None`` = off) downscales an image whose longer side exceeds it
  (area averaging) before the call, to bound GPU memory: Sa2VA's vision tiles and the grounding
  path are derived from the input. The outputs come back at the original size: with a soft mask
  the captured logits are resized straight to the original size (bilinear) and the mask is
  ``prob > 0.5``; without one the mask is upscaled nearest-neighbour. The Ray worker lowers the
  cap after a CUDA out-of-memory error. The cap is part of ``backend_id``.
- **backend_id** names the source (folder path + digest of its files, or Hub id + commit), the
  dtype, the device type, the prompt template version, this module's post-processing version
  and the input cap: it changes whenever the outputs could.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.errors import UserError
from models.segmentation import Segmentation

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "<image>Please {prompt}."
PROMPT_TEMPLATE_VERSION = "v1"
# Bump when the post-processing below (capture, resizing, union, reconciliation) changes outputs.
POSTPROCESS_VERSION = "1"

FLAG_NO_SEG_TOKEN = "no_seg_token"
FLAG_PROB_UNAVAILABLE = "prob_unavailable"
FLAG_MULTIPLE_SEG_TOKENS = "multiple_seg_tokens"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+")
_DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?")
# Files up to this size enter the folder digest by content; larger ones (weight shards of
# gigabytes) by size and modification time, which is what a re-download or re-export changes.
CONTENT_HASH_MAX_BYTES = 16 * 2**20
# Share of pixels where sigmoid(captured logits) > 0.5 may differ from the model's own mask:
# resizing in bfloat16 (model) vs float32 (here) flips only pixels whose logit is about 0. More
# than this means the captured tensor is not the one the model thresholded.
_MAX_DISAGREEMENT = 0.01
_DOWNLOAD_HINT = (
    "Download the weights once on a machine with internet access, e.g. "
    "`huggingface-cli download ByteDance/Sa2VA-4B --local-dir /models/Sa2VA-4B`, and pass that "
    "folder; `pip install .[sa2va]` installs the extra packages Sa2VA's remote code imports."
)


def format_prompt(prompt: str) -> str:
    """The text Sa2VA receives for an instruction: ``"<image>Please <prompt>."``."""
    body = prompt.strip().rstrip(".").strip()
    if not body:
        raise ValueError(f"prompt must name what to segment, got {prompt!r}")
    return PROMPT_TEMPLATE.format(prompt=body)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _DEVICE_RE.fullmatch(device):
        raise UserError(f"device {device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"device {device!r} was requested but torch sees no CUDA GPU; "
                "use device='cpu' or 'auto', or install a CUDA build of torch"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are "
                "visible (check CUDA_VISIBLE_DEVICES)"
            )
    return torch.device(device)


def folder_digest(folder: Path) -> str:
    """Short digest of a model folder: small files by content, large ones by size and mtime.

    Hidden entries (``.cache/`` written by ``huggingface-cli``) and ``__pycache__`` are skipped
    because they change without the model changing.
    """
    digest = hashlib.sha256()
    for path in sorted(_model_files(folder)):
        relative = path.relative_to(folder).as_posix()
        stat = path.stat()
        if stat.st_size <= CONTENT_HASH_MAX_BYTES:
            content = hashlib.sha256(path.read_bytes()).hexdigest()
            digest.update(f"{relative}\0content\0{content}\n".encode())
        else:
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _model_files(folder: Path) -> list[Path]:
    files = []
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if any(p.startswith(".") or p == "__pycache__" for p in parts):
            continue
        if path.is_file():
            files.append(path)
    return files


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a local folder or a Hub id (+ commit)."""

    location: str
    is_local: bool
    revision: str | None

    @classmethod
    def resolve(
        cls, model_path: str | os.PathLike[str], revision: str | None, allow_unpinned: bool
    ) -> ModelSource:
        """Validate ``model_path``/``revision`` against the loading rules (see module doc)."""
        text = os.fspath(model_path)
        path = Path(text).expanduser()
        if path.exists() or not _HUB_ID_RE.fullmatch(text):
            return cls._local(path, revision)
        if revision is not None and not _COMMIT_RE.fullmatch(revision):
            raise UserError(
                f"Sa2VA revision {revision!r} for {text!r} is not a 40-hex commit id; branch and "
                "tag names can move. Pin the commit shown on the repository's "
                "'Files and versions' page."
            )
        if revision is None and not allow_unpinned:
            raise UserError(
                f"Sa2VA model {text!r} is a Hugging Face Hub id without a pinned revision: "
                "loading it would run whatever remote code the repository holds today. Pass "
                "revision='<40-hex commit>', or a local folder "
                f"(`huggingface-cli download {text} --local-dir /models/{text.split('/')[-1]}`),"
                " or set allow_unpinned_remote_code=True if you accept that risk. (If you meant "
                f"a local folder: '{path.resolve()}' does not exist.)"
            )
        return cls(location=text, is_local=False, revision=revision)

    @classmethod
    def _local(cls, path: Path, revision: str | None) -> ModelSource:
        if not path.exists():
            raise UserError(f"Sa2VA model folder '{path}' does not exist. {_DOWNLOAD_HINT}")
        if not (path / "config.json").is_file():
            raise UserError(
                f"Sa2VA model folder '{path}' has no config.json, so it is not a Hugging Face "
                f"model folder (or the download is incomplete). {_DOWNLOAD_HINT}"
            )
        if revision is not None:
            raise UserError(
                f"revision {revision!r} was given for the local folder '{path}'; a revision only "
                "applies to a Hub id. Drop it (the folder's file digest identifies the weights)."
            )
        return cls(location=str(path.resolve()), is_local=True, revision=None)

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by every ``from_pretrained`` call."""
        kwargs: dict[str, Any] = {"trust_remote_code": True, "local_files_only": self.is_local}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        return kwargs


@dataclass(frozen=True)
class _Capture:
    """What one ``language_embd_inference`` call produced: one [SEG] token's mask logits."""

    logits: torch.Tensor
    score: float | None


class _MaskLogitRecorder:
    """Keeps the mask logits (and SAM2's predicted IoU) of every [SEG] token of one call.

    ``predict_forward`` calls ``grounding_encoder.language_embd_inference`` as a plain method,
    which a forward hook would not see, so the method is wrapped on the instance. SAM2's mask
    decoder is an ``nn.Module`` called through ``__call__``, so a forward hook reads its IoU.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.captures: list[_Capture] = []
        self.unavailable_reason: str | None = None
        self._call_ious: list[float] = []
        self._undo: list[Callable[[], None]] = []
        encoder = getattr(model, "grounding_encoder", None)
        method = getattr(encoder, "language_embd_inference", None)
        if encoder is None or not callable(method):
            self.unavailable_reason = (
                f"{type(model).__name__} has no grounding_encoder.language_embd_inference "
                "(the SAM2 call whose output Sa2VA thresholds), so mask logits cannot be captured"
            )
            return
        self._wrap(encoder, method)
        decoder = getattr(getattr(encoder, "sam2_model", None), "sam_mask_decoder", None)
        if isinstance(decoder, torch.nn.Module):
            handle = decoder.register_forward_hook(self._on_decoder_output)
            self._undo.append(handle.remove)

    def _wrap(self, encoder: Any, method: Callable[..., Any]) -> None:
        def language_embd_inference(*args: Any, **kwargs: Any) -> Any:
            self._call_ious = []
            logits = method(*args, **kwargs)
            score = self._call_ious[0] if self._call_ious else None
            if isinstance(logits, torch.Tensor):
                self.captures.append(_Capture(logits.detach(), score))
            return logits

        encoder.language_embd_inference = language_embd_inference
        self._undo.append(lambda: delattr(encoder, "language_embd_inference"))

    def _on_decoder_output(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        # SAM2 MaskDecoder returns (masks, iou_pred (B, M), sam_tokens, object_score_logits);
        # with several candidate masks SAM2 keeps the one with the highest predicted IoU.
        if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
            self._call_ious.append(float(output[1].detach().float().max()))

    def reset(self) -> None:
        self.captures = []
        self._call_ious = []

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []


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
    ) -> None:
        """Load the model, tokenizer (and processor for Qwen variants) onto ``device``.

        Args:
            model_path: a local model folder, or a Hub id such as ``"ByteDance/Sa2VA-4B"``.
            revision: the 40-hex commit to load a Hub id at; not allowed with a local folder.
            device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``; default bfloat16 on GPU,
                float32 on CPU.
            input_cap: longest image side passed to the model, ``None`` for no cap.
            processor: an ``AutoProcessor`` for Qwen-based variants; loaded when omitted.
            allow_unpinned_remote_code: accept a Hub id without ``revision``.

        Raises:
            UserError: missing folder, unpinned Hub id, missing remote-code dependency, bad
                device/dtype/cap, or a checkpoint that cannot be read.
        """
        self._source = ModelSource.resolve(model_path, revision, allow_unpinned_remote_code)
        self._device = resolve_device(device)
        self._dtype = _resolve_dtype(dtype, self._device)
        self._input_cap = _check_cap(input_cap)
        self._weights_id = self._source_digest()
        self._model, self._tokenizer = _load(self._source, self._dtype, self._device)
        self._processor = processor if processor is not None else self._maybe_processor()
        if self._source.revision is None and not self._source.is_local:
            self._weights_id = _cached_commit(self._source.location) or "unpinned"
        self._recorder = _MaskLogitRecorder(self._model)
        self._lock = threading.Lock()
        self._closed = False
        self._logged: set[str] = set()

    @property
    def backend_id(self) -> str:
        """Changes whenever outputs could: source + weights, dtype, device type, versions, cap."""
        return (
            f"sa2va:{self._source.location}@{self._weights_id}:{_dtype_name(self._dtype)}"
            f":{self._device.type}:prompt-{PROMPT_TEMPLATE_VERSION}:post-{POSTPROCESS_VERSION}"
            f":cap-{self._input_cap if self._input_cap is not None else 'none'}"
        )

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

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        """Segment what ``prompt`` names in ``image`` (uint8 HxWx3 RGB); one model call."""
        _check_image(image)
        text = format_prompt(prompt)
        model_image = _fit_to_cap(image, self._input_cap)
        with self._lock:
            if self._closed:
                raise RuntimeError("Sa2VASegmenter.segment() called after close()")
            kwargs: dict[str, Any] = {
                "image": Image.fromarray(model_image),
                "text": text,
                "tokenizer": self._tokenizer,
            }
            if self._processor is not None:
                kwargs["processor"] = self._processor
            self._recorder.reset()
            with torch.no_grad():
                output = self._model.predict_forward(**kwargs)
            captures = list(self._recorder.captures)
        return self._result(output, captures, image.shape[:2], model_image.shape[:2])

    def close(self) -> None:
        """Remove the hooks and drop the model (frees GPU memory once nothing else holds it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._recorder.remove()
            del self._model, self._tokenizer, self._processor
            if self._device.type == "cuda":
                torch.cuda.empty_cache()

    def _source_digest(self) -> str:
        if self._source.is_local:
            return folder_digest(Path(self._source.location))
        return self._source.revision or "unpinned"

    def _maybe_processor(self) -> Any | None:
        if "qwen" not in type(self._model).__name__.lower():
            return None
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(
                self._source.location, **self._source.load_kwargs()
            )
        except ImportError as exc:
            raise _missing_dependency(self._source, exc) from exc

    def _result(
        self,
        output: dict[str, Any],
        captures: list[_Capture],
        size: tuple[int, ...],
        model_size: tuple[int, ...],
    ) -> Segmentation:
        full_size = (int(size[0]), int(size[1]))
        hard_masks = [_hard_mask(m, model_size) for m in output.get("prediction_masks") or []]
        if not hard_masks:
            empty = np.zeros(full_size, dtype=bool)
            return Segmentation(empty, np.zeros(full_size, np.float32), None, (FLAG_NO_SEG_TOKEN,))
        flags = [FLAG_MULTIPLE_SEG_TOKENS] if len(hard_masks) > 1 else []
        score = captures[0].score if captures else None
        prob = self._soft_mask(captures, hard_masks, full_size)
        if prob is not None:
            return Segmentation(prob > 0.5, prob, score, tuple(flags))
        mask = _upscale_nearest(np.logical_or.reduce(hard_masks), full_size)
        return Segmentation(mask, None, score, (*flags, FLAG_PROB_UNAVAILABLE))

    def _soft_mask(
        self, captures: list[_Capture], hard_masks: list[np.ndarray], size: tuple[int, int]
    ) -> np.ndarray | None:
        prob_or_reason = _soft_mask_or_reason(
            self._recorder.unavailable_reason, captures, hard_masks, size
        )
        if isinstance(prob_or_reason, np.ndarray):
            return prob_or_reason
        if prob_or_reason not in self._logged:
            self._logged.add(prob_or_reason)
            logger.warning("Sa2VA soft masks unavailable (prob=None): %s", prob_or_reason)
        return None


def _soft_mask_or_reason(
    unavailable_reason: str | None,
    captures: list[_Capture],
    hard_masks: list[np.ndarray],
    size: tuple[int, int],
) -> np.ndarray | str:
    """The soft mask at ``size`` from the captured logits, or why there is none."""
    if unavailable_reason is not None:
        return unavailable_reason
    if len(captures) != len(hard_masks):
        return (
            f"captured {len(captures)} logit maps for {len(hard_masks)} masks; the model no "
            "longer calls language_embd_inference once per [SEG] token"
        )
    probs = []
    for capture, hard in zip(captures, hard_masks, strict=True):
        if capture.logits.ndim != 4:
            return (
                f"captured logits have shape {tuple(capture.logits.shape)}, "
                "expected (frames, 1, H, W)"
            )
        at_model_size = _sigmoid_resized(capture.logits, hard.shape)
        disagreement = np.count_nonzero((at_model_size > 0.5) != hard) / hard.size
        if disagreement > _MAX_DISAGREEMENT:
            return (
                f"sigmoid(captured logits) > 0.5 differs from the model's mask on "
                f"{disagreement:.1%} of pixels; the model post-processes the logits after "
                "language_embd_inference"
            )
        if hard.shape == size:
            probs.append(_agree_with(at_model_size, hard))
        else:
            probs.append(_sigmoid_resized(capture.logits, size))
    return np.maximum.reduce(probs)


def _load(source: ModelSource, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(
            source.location,
            low_cpu_mem_usage=True,
            **{_dtype_kwarg(): dtype},
            **source.load_kwargs(),
        )
        tokenizer = AutoTokenizer.from_pretrained(
            source.location, use_fast=False, **source.load_kwargs()
        )
    except ImportError as exc:
        raise _missing_dependency(source, exc) from exc
    except OSError as exc:
        where = f"folder '{source.location}'" if source.is_local else f"Hub id {source.location!r}"
        raise UserError(f"could not load Sa2VA from the {where}: {exc}. {_DOWNLOAD_HINT}") from exc
    model = model.eval().to(device)
    _prepare_generation(model, tokenizer, dtype)
    return model, tokenizer


def _prepare_generation(model: Any, tokenizer: Any, dtype: torch.dtype) -> None:
    # The InternVL-based remote code prepares itself lazily on the first predict_forward and then
    # casts the whole model to bfloat16 unless told otherwise; preparing it here keeps `dtype`.
    prepare = getattr(model, "preparing_for_generation", None)
    if callable(prepare) and "torch_dtype" in inspect.signature(prepare).parameters:
        prepare(tokenizer=tokenizer, torch_dtype=dtype)
    # The Qwen-based remote code casts its grounding inputs to `model.torch_dtype` (bfloat16).
    if isinstance(getattr(model, "torch_dtype", None), torch.dtype):
        model.torch_dtype = dtype


def _dtype_kwarg() -> str:
    # transformers 4.56 renamed `torch_dtype` to `dtype` (the old name warns in 5.x).
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _missing_dependency(source: ModelSource, exc: ImportError) -> UserError:
    missing = exc.name
    if missing is None:
        found = re.search(r"not found in your environment: ([^.]+)\.", str(exc))
        missing = found.group(1) if found else "unknown"
    return UserError(
        f"Sa2VA's remote code in {source.location} needs the Python package(s) {missing}, "
        f"which are not installed ({exc}). Install Sa2VA's extra dependencies with "
        "`pip install .[sa2va]` in the sa2va-rl checkout (or `pip install 'sa2va-rl[sa2va]'`)."
    )


def _cached_commit(repo_id: str) -> str | None:
    """The commit of the snapshot an unpinned Hub id was just loaded from (HF cache layout
    ``.../snapshots/<commit>/config.json``), so the backend id still names the weights."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(cached, str):
        return None
    commit = Path(cached).parent.name
    return commit if _COMMIT_RE.fullmatch(commit) else None


def _resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"Sa2VA dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_cap(cap: int | None) -> int | None:
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise UserError(f"Sa2VA input_cap must be a positive int or None, got {cap!r}")
    return cap


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


def _hard_mask(mask: Any, model_size: tuple[int, ...]) -> np.ndarray:
    # predict_forward returns one (frames, H, W) bool array per [SEG]; an image has one frame.
    array = np.asarray(mask)
    array = array[0] if array.ndim == 3 else array
    if array.shape != tuple(model_size[:2]):
        raise RuntimeError(f"Sa2VA returned a mask of shape {array.shape} for {model_size[:2]}")
    return array.astype(bool)


def _sigmoid_resized(logits: torch.Tensor, size: tuple[int, ...]) -> np.ndarray:
    # Same resize as Sa2VA's predict_forward: bilinear, align_corners=False, first frame/object.
    resized = F.interpolate(
        logits[:1, :1].float(), size=(int(size[0]), int(size[1])), mode="bilinear",
        align_corners=False,
    )  # fmt: skip
    return torch.sigmoid(resized[0, 0]).cpu().numpy().astype(np.float32)


def _agree_with(prob: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # Nudge the few pixels where float32 and the model's own precision disagree about the 0.5
    # threshold, so that `prob > 0.5` is exactly the model's mask.
    prob = prob.copy()
    prob[mask & (prob <= 0.5)] = np.nextafter(np.float32(0.5), np.float32(1.0))
    prob[~mask & (prob > 0.5)] = np.float32(0.5)
    return prob


def _upscale_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape == size:
        return mask
    rows = ((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(int)
    cols = ((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(int)
    return mask[np.minimum(rows, mask.shape[0] - 1)][:, np.minimum(cols, mask.shape[1] - 1)]
