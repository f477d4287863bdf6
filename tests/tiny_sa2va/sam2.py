"""SAM2 stand-in with the structure of Sa2VA's ``sam2.py`` wherever the segmenter touches it.

- ``SAM2`` (the model's ``grounding_encoder``): ``preprocess_image``, ``get_sam2_embeddings``
  (``sam2_model.init_state``: an inference state with an empty ``cached_features``, no compute)
  and ``language_embd_inference(inference_state, [language_embd] * frames)``, which returns
  float32 **logits** of shape (frames, 1, 1024, 1024), upsampled bilinearly from the 256x256
  low-res masks as SAM2 does;
- ``SAM2.sam2_model`` (upstream's ``SAM2VideoPredictor``): ``add_language_embd`` ->
  ``_get_image_feature``, which looks in ``inference_state["cached_features"]`` first and on a
  miss runs ``forward_image`` (the image-only encoder, ``image_encoder``: Hiera + FPN upstream)
  and caches its output in that state only, as upstream does;
- ``SAM2.sam2_model.sam_mask_decoder``: an ``nn.Module`` returning ``(low_res_multimasks (B, 3,
  256, 256), ious (B, 3), sam_output_tokens, object_score_logits)`` like SAM2's ``MaskDecoder``
  with ``multimask_output``; ``_forward_sam_heads`` keeps the candidate with the largest
  predicted IoU (argmax) and drops the IoUs.

The "segmentation" is image darkness: a 3x3 convolution with negative weights on the
4x-downsampled image (one candidate per output channel, shifted by -1, 0, +1), plus a bias from
the [SEG] embedding. ``image_encoder.calls`` counts the image encoder's runs.
"""

import torch
import torch.nn.functional as F
from torch import nn

CANDIDATE_OFFSETS = (-1.0, 0.0, 1.0)


class ImageEncoder(nn.Module):
    """The image-only encoder (upstream: Hiera trunk + FPN neck); counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, sample: torch.Tensor) -> dict:
        self.calls += 1
        features = F.avg_pool2d(sample, kernel_size=4)
        return {
            "vision_features": features,
            "vision_pos_enc": [torch.zeros_like(features)],
            "backbone_fpn": [features],
        }


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


class SAM2VideoPredictor(nn.Module):
    """The predictor upstream's ``SAM2.sam2_model`` is, reduced to the single-frame path."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.image_encoder = ImageEncoder()
        self.sam_mask_decoder = MaskDecoder()

    def forward_image(self, img_batch: torch.Tensor) -> dict:
        return self.image_encoder(img_batch)

    def init_state(self, images: torch.Tensor) -> dict:
        return {"images": images, "num_frames": len(images), "cached_features": {}}

    def _get_image_feature(self, inference_state: dict, frame_idx: int, batch_size: int):
        image, backbone_out = inference_state["cached_features"].get(frame_idx, (None, None))
        if backbone_out is None:
            image = inference_state["images"][frame_idx].unsqueeze(0)
            backbone_out = self.forward_image(image)
            inference_state["cached_features"] = {frame_idx: (image, backbone_out)}
        features = backbone_out["backbone_fpn"][-1].expand(batch_size, -1, -1, -1)
        return image.expand(batch_size, -1, -1, -1), features

    def add_language_embd(
        self, inference_state: dict, frame_idx: int, obj_id: int, language_embd, inference=False
    ):
        _, features = self._get_image_feature(inference_state, frame_idx, 1)
        return frame_idx, [obj_id], self._forward_sam_heads(features, language_embd)

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
        self.sam2_model = SAM2VideoPredictor(image_size)

    def preprocess_image(self, image: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
        return (image.float() / 255.0).to(dtype)

    def get_sam2_embeddings(self, images: torch.Tensor) -> dict:
        return self.sam2_model.init_state(images)

    def language_embd_inference(self, inference_state: dict, language_embd: list) -> torch.Tensor:
        outputs = []
        for frame_idx, embd in enumerate(language_embd):
            _, _, logits = self.sam2_model.add_language_embd(
                inference_state, frame_idx, 100, embd[None], inference=True
            )
            outputs.append(logits)
        return torch.cat(outputs, dim=0)
