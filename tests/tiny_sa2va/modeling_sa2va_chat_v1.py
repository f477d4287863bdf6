"""v1 tiny Sa2VA (copied as ``modeling_sa2va_chat.py``): ``Sa2VAChatModel`` as in
magic-research/Sa2VA's ``projects/llava_sam2/hf/models``: ``predict_forward`` has neither
``processor`` nor ``**kwargs``; ``preparing_for_generation`` casts the model to ``torch_dtype``."""

import torch
from transformers import PreTrainedModel

from .configuration_sa2va_chat import Sa2VAChatConfig
from .sam2 import SAM2
from .tiny_lm import InternVLMixin


class Sa2VAChatModel(InternVLMixin, PreTrainedModel):
    config_class = Sa2VAChatConfig
    base_model_prefix = "sa2va"
    main_input_name = "pixel_values"

    def __init__(self, config: Sa2VAChatConfig) -> None:
        super().__init__(config)
        self._build(config, SAM2)

    def _init_weights(self, module) -> None:
        # Weights always come from the saved safetensors file.
        return

    def preparing_for_generation(
        self, tokenizer, max_new_tokens: int = 2048, torch_dtype=torch.bfloat16
    ) -> None:
        self._prepare_internvl(tokenizer, max_new_tokens, torch_dtype)
        self.to(torch_dtype)

    def predict_forward(
        self,
        image=None,
        video=None,
        text=None,
        past_text="",
        mask_prompts=None,
        tokenizer=None,
    ):
        if not self.init_prediction_config:
            assert tokenizer
            self.preparing_for_generation(tokenizer=tokenizer)
        return self._segment_internvl(image, text, tokenizer)
