"""The Sa2VA segmentation backend: ByteDance Sa2VA run through its own Hugging Face remote code.

Usage::

    seg = Sa2VASegmenter("/models/Sa2VA-4B", device="cuda:0")
    result = seg.segment(image_rgb_uint8, "Please segment the blood vessel.")
    result.mask, result.prob, result.score, result.flags

What a caller needs to know:

- **Checkpoints** (``generations``). v2 InternVL-based (``Sa2VAChatModel``, Sa2VA-1B/4B/8B/26B
  and fine-tunes) and v2 Qwen-VL-based (``Sa2VAChatModelQwen``) load with the pinned transformers
  (``>=4.57,<5``); the older v1 code (magic-research) needs transformers ``>=4.49,<4.52`` and is
  refused with the command to run. :func:`preflight` checks a folder (generation, transformers,
  packages the code imports, device) without loading it: the orchestrator calls it before any
  worker starts, and the segmenter again before loading.
- **Safe loading** (``source``). Sa2VA runs its own Python code (``trust_remote_code=True``). A
  local folder is loaded offline; a Hub id needs a pinned 40-hex commit ``revision`` unless
  ``allow_unpinned_remote_code=True``.
- **Device** (``devices``). CUDA only: ``auto`` never falls back to the CPU; ``cuda:N`` is made
  the current device for loading and every call; an explicit ``cpu`` is for debugging with code
  that does not hard-code CUDA; bfloat16/float16 only on CUDA.
- **One image per call, many prompts.** Sa2VA has no batch inference and ``predict_forward``
  mutates model state, so calls on one instance are serialised on a lock; run one instance per
  GPU. ``segment_prompts(image, prompts)`` runs one ``predict_forward`` per prompt but the
  vision encoder and SAM2's image encoder once per image (``image_work``), with answers equal
  to the per-prompt path; everything runs under ``torch.inference_mode()``.
- **Bounded answers** (``answer_limit``). At most ``max_new_tokens`` (default 64) answer tokens
  per prompt; a longer answer is cut and its result flagged ``"answer_truncated"``.
- **Prompt.** A full instruction such as ``"Please segment the blood vessel."``; the model sees
  ``"<image>Please segment the blood vessel."``. ``PROMPT_TEMPLATE_VERSION`` is in ``backend_id``.
- **Qwen processor.** Passed only where ``predict_forward`` takes ``processor``; for Qwen
  variants it is loaded with ``AutoProcessor`` and must have a tokenizer and an image processor.
- **Soft masks and score** (``capture``). ``prob`` is the sigmoid of the logits the model
  thresholds, resized as the model does, with ``mask == (prob > 0.5)``; where the capture is
  impossible or disagrees with the model's mask ``prob`` is ``None`` (flag
  ``"prob_unavailable"``). ``score`` is the IoU SAM2 predicted for the candidate it selected.
- **No [SEG]** gives an empty mask, an all-zero ``prob``, ``score=None``, flag
  ``"no_seg_token"``; several [SEG] tokens give the union of their masks (flag
  ``"multiple_seg_tokens"``), the maximum of their probabilities and the first mask's score.
- **Input cap.** ``input_cap`` downscales an image whose longer side exceeds it before the call;
  outputs come back at the original size. The Ray worker lowers it after CUDA OOM.
- **backend_id** names the source (folder path + digest, or Hub id + commit), dtype, device
  type, prompt template version, post-processing version, ``max_new_tokens`` and input cap.
"""

from models.sa2va.answer_limit import DEFAULT_MAX_NEW_TOKENS, FLAG_ANSWER_TRUNCATED
from models.sa2va.capture import FLAG_MULTIPLE_SEG_TOKENS, FLAG_NO_SEG_TOKEN, FLAG_PROB_UNAVAILABLE
from models.sa2va.generations import V1, V2_INTERNVL, V2_QWEN, Checkpoint, Generation
from models.sa2va.image_work import ImageWork
from models.sa2va.loading import preflight
from models.sa2va.segmenter import (
    POSTPROCESS_VERSION,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_VERSION,
    Sa2VASegmenter,
    format_prompt,
)
from models.sa2va.source import ModelSource, folder_digest

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "FLAG_ANSWER_TRUNCATED",
    "FLAG_MULTIPLE_SEG_TOKENS",
    "FLAG_NO_SEG_TOKEN",
    "FLAG_PROB_UNAVAILABLE",
    "POSTPROCESS_VERSION",
    "PROMPT_TEMPLATE",
    "PROMPT_TEMPLATE_VERSION",
    "V1",
    "V2_INTERNVL",
    "V2_QWEN",
    "Checkpoint",
    "Generation",
    "ImageWork",
    "ModelSource",
    "Sa2VASegmenter",
    "folder_digest",
    "format_prompt",
    "preflight",
]
