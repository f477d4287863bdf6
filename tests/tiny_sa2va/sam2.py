"""SAM2 stand-in with the structure Sa2VA's ``sam2.py`` has where the segmenter touches it.

- ``SAM2`` (the model's ``grounding_encoder``): ``preprocess_image``, ``get_sam2_embeddings`` and
  ``language_embd_inference(inference_state, [language_embd] * frames)``, which returns float32
  **logits** of shape (frames, 1, 1024, 1024), upsampled bilinearly from the 256x256 low-res
  masks as SAM2 does;
- ``SAM2.sam2_model.sam_mask_decoder``: an ``nn.Module`` returning ``(low_res_multimasks (B, 3,
  256, 256), ious (B, 3), sam_output_tokens, object_score_logits)`` like SAM2's ``MaskDecoder``
  with ``multimask_output``; ``_forward_sam_heads`` keeps the candidate with the largest
  predicted IoU (argmax) and drops the IoUs.

The "segmentation" is image darkness: a 3x3 convolution with negative weights on the
4x-downsampled image (one candidate per output channel, shifted by -1, 0, +1), plus a bias from
the [SEG] embedding.
"""

import torch
import torch.nn.functional as F
from torch import nn

CANDIDATE_OFFSETS = (-1.0, 0.0, 1.0)


class MaskDecoder(nn.Module):
    """Three candidate masks and a predicted IoU per candidate."""

    def __init__(self) -> None:
        super().__init__()
        # Replicate padding: zero padding would make the border look dark, i.e. "vessel".
        self.conv = nn.Conv2d(3, 3, kernel_size=3, padding=1, padding_mode="replicate")
        self.iou_prediction_head = nn.Linear(3, 3)
        self.register_buffer("offsets", torch.tensor(CANDIDATE_OFFSETS), persistent=False)
        self.last_ious: torch.Tensor | None = None
        self.iou_log: list = []  # every call's IoUs, for tests of several [SEG] tokens

    def forward(
        self,
        image_embeddings: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        bias = sparse_prompt_embeddings.sum(dim=(1, 2))[:, None, None, None]
        masks = self.conv(image_embeddings) + bias + self.offsets[None, :, None, None]
        ious = torch.sigmoid(self.iou_prediction_head(masks.abs().mean(dim=(2, 3))))
        self.last_ious = ious.detach().clone()
        self.iou_log.append(self.last_ious)
        object_score_logits = masks.amax(dim=(1, 2, 3))[:, None]
        if not multimask_output:
            masks, ious = masks[:, :1], ious[:, :1]
        return masks, ious, sparse_prompt_embeddings, object_score_logits


class SAM2Base(nn.Module):
    """Holds the decoder under the attribute path the real SAM2 predictor uses."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.sam_mask_decoder = MaskDecoder()

    def _forward_sam_heads(
        self, backbone_features: torch.Tensor, language_embd: torch.Tensor
    ) -> torch.Tensor:
        multimasks, ious, _, _ = self.sam_mask_decoder(
            image_embeddings=backbone_features,
            sparse_prompt_embeddings=language_embd,
            multimask_output=True,
        )
        best = torch.argmax(ious, dim=-1)
        low_res = multimasks[torch.arange(multimasks.shape[0]), best].unsqueeze(1)
        return F.interpolate(
            low_res.float(),
            size=(self.image_size, self.image_size),
            mode="bilinear",
            align_corners=False,
        )


class SAM2(nn.Module):
    """The model's ``grounding_encoder``, reduced to its inference methods."""

    def __init__(self, image_size: int = 1024) -> None:
        super().__init__()
        self.sam2_model = SAM2Base(image_size)

    def preprocess_image(self, image: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
        return (image.float() / 255.0).to(dtype)

    def get_sam2_embeddings(self, images: torch.Tensor) -> dict:
        return {"features": F.avg_pool2d(images, kernel_size=4)}

    def language_embd_inference(self, inference_state: dict, language_embd: list) -> torch.Tensor:
        outputs = []
        for frame_idx, embd in enumerate(language_embd):
            features = inference_state["features"][frame_idx : frame_idx + 1]
            outputs.append(self.sam2_model._forward_sam_heads(features, embd[None]))
        return torch.cat(outputs, dim=0)
