"""A tiny, deterministic stand-in for ByteDance Sa2VA's remote code (``modeling_sa2va_chat.py``).

It keeps the parts of the real model the segmenter relies on, with the same names and shapes:
- ``predict_forward(image, text, tokenizer, ...) -> {"prediction": str, "prediction_masks":
  [bool ndarray (1, H, W)]}``, answering ``"Sure, [SEG]."`` and returning one mask per [SEG];
- ``preparing_for_generation(tokenizer, max_new_tokens, torch_dtype)``, which the real model calls
  lazily and which casts the whole model to ``torch_dtype`` (bfloat16 by default);
- ``grounding_encoder`` (the SAM2 wrapper) with ``preprocess_image``, ``get_sam2_embeddings`` and
  ``language_embd_inference(state, [language_embd] * frames) -> logits (frames, 1, S, S)``, where
  ``S`` is the fixed grounding resolution; ``predict_forward`` resizes those logits bilinearly to
  the image size and thresholds ``sigmoid > 0.5``, exactly like the real code;
- ``grounding_encoder.sam2_model.sam_mask_decoder``, an ``nn.Module`` called once per [SEG] that
  returns ``(low_res_masks, ious, sam_tokens, object_score_logits)`` like SAM2's ``MaskDecoder``.

The "segmentation" itself is image darkness: a 3x3 convolution with negative weights on the
4x-downsampled image, plus a small per-prompt bias from the [SEG] "hidden state".
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .configuration_tiny_sa2va import TinySa2VAConfig


class TinyMaskDecoder(nn.Module):
    """SAM2 ``MaskDecoder`` look-alike: low-res logits plus a predicted IoU per mask."""

    def __init__(self) -> None:
        super().__init__()
        # Replicate padding: zero padding would make the border look dark, i.e. "vessel".
        self.conv = nn.Conv2d(3, 1, kernel_size=3, padding=1, padding_mode="replicate")
        self.last_ious: torch.Tensor | None = None

    def forward(
        self, image_embeddings: torch.Tensor, sparse_prompt_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        bias = sparse_prompt_embeddings.sum(dim=(1, 2))[:, None, None, None]
        low_res_masks = self.conv(image_embeddings) + bias
        ious = torch.sigmoid(low_res_masks.abs().mean(dim=(2, 3)))
        self.last_ious = ious.detach().clone()
        object_score_logits = low_res_masks.amax(dim=(2, 3))
        return low_res_masks, ious, sparse_prompt_embeddings, object_score_logits


class TinySAM2Model(nn.Module):
    """Holds the decoder under the attribute path the real SAM2 video predictor uses."""

    def __init__(self) -> None:
        super().__init__()
        self.sam_mask_decoder = TinyMaskDecoder()


class TinyGroundingEncoder(nn.Module):
    """The real model's ``SAM2`` wrapper, reduced to its inference methods."""

    def __init__(self, sam_size: int) -> None:
        super().__init__()
        self.sam_size = sam_size
        self.sam2_model = TinySAM2Model()

    def preprocess_image(self, image: torch.Tensor) -> torch.Tensor:
        return image.float() / 255.0

    def get_sam2_embeddings(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": F.avg_pool2d(images, kernel_size=4)}

    def language_embd_inference(
        self, inference_state: dict[str, torch.Tensor], language_embd: list[torch.Tensor]
    ) -> torch.Tensor:
        outputs = []
        for frame_idx, embd in enumerate(language_embd):
            features = inference_state["features"][frame_idx : frame_idx + 1]
            low_res, _, _, _ = self.sam2_model.sam_mask_decoder(features, embd[None])
            outputs.append(
                F.interpolate(
                    low_res,
                    size=(self.sam_size, self.sam_size),
                    mode="bilinear",
                    align_corners=False,
                )
            )
        return torch.cat(outputs, dim=0)


class TinySa2VAModel(PreTrainedModel):
    """Answers every prompt with one [SEG] (unless it holds ``config.no_seg_word``)."""

    config_class = TinySa2VAConfig
    base_model_prefix = "tiny_sa2va"
    main_input_name = "pixel_values"

    def __init__(self, config: TinySa2VAConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim)
        self.text_hidden_fcs = nn.Linear(config.embed_dim, 1)
        setattr(self, config.grounding_attr, TinyGroundingEncoder(config.sam_size))
        self.init_prediction_config = False
        self.torch_dtype = torch.bfloat16
        self.last_image_size: tuple[int, int] | None = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Weights always come from the saved safetensors file; nothing to initialise.
        return

    def preparing_for_generation(
        self, tokenizer, max_new_tokens: int = 2048, torch_dtype: torch.dtype = torch.bfloat16
    ) -> None:
        self.tokenizer = tokenizer
        self.seg_token_idx = tokenizer.convert_tokens_to_ids("[SEG]")
        self.torch_dtype = torch_dtype
        self.to(torch_dtype)
        self.init_prediction_config = True

    def predict_forward(
        self,
        image=None,
        video=None,
        text=None,
        past_text="",
        mask_prompts=None,
        tokenizer=None,
        **kwargs,
    ) -> dict:
        if not self.init_prediction_config:
            self.preparing_for_generation(tokenizer=tokenizer)
        self.last_image_size = image.size
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.convert_tokens_to_ids(self.config.no_seg_word) in ids:
            return {"prediction": "It is an angiogram.</s>", "prediction_masks": []}

        seg_hidden = self.embed_tokens(torch.tensor(ids, device=self.device)).mean(0, keepdim=True)
        language_embd = self.text_hidden_fcs(seg_hidden)
        grounding = getattr(self, self.config.grounding_attr)
        size = self.config.sam_size
        g_image = torch.from_numpy(np.array(image.resize((size, size))))
        g_image = g_image.permute(2, 0, 1).contiguous().to(self.device)
        g_pixel_values = torch.stack([grounding.preprocess_image(g_image)]).to(self.torch_dtype)
        sam_states = grounding.get_sam2_embeddings(g_pixel_values)
        pred_masks = grounding.language_embd_inference(sam_states, [language_embd])
        pred_masks = pred_masks + self.config.post_capture_bias
        w, h = image.size
        masks = F.interpolate(pred_masks, size=(h, w), mode="bilinear", align_corners=False)
        masks = masks[:, 0].sigmoid() > 0.5
        return {"prediction": "Sure, [SEG].</s>", "prediction_masks": [masks.cpu().numpy()]}
