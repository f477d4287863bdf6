"""v2 Qwen-VL-style tiny Sa2VA: ``Sa2VAChatModelQwen`` as in bytedance/Sa2VA's
``models_qwen2_5_vl``/``models_qwen3vl``: never calls ``post_init()``; ``predict_forward`` asserts
a ``processor``; has no ``preparing_for_generation``; grounding inputs are cast to
``self.torch_dtype`` (bfloat16 unless set); ``self.model.generate`` gets ``max_new_tokens=2048``."""

from transformers import PreTrainedModel

from .configuration_sa2va_chat import Sa2VAChatConfigQwen
from .sam2 import SAM2
from .tiny_lm import TinySa2VAMixin


class Sa2VAChatModelQwen(TinySa2VAMixin, PreTrainedModel):
    config_class = Sa2VAChatConfigQwen
    base_model_prefix = "sa2va"
    main_input_name = "pixel_values"

    def __init__(self, config: Sa2VAChatConfigQwen) -> None:
        super().__init__(config)
        self._build(config, SAM2, qwen=True)

    def _init_weights(self, module) -> None:
        # Weights always come from the saved safetensors file.
        return

    def predict_forward(
        self,
        image=None,
        video=None,
        text=None,
        past_text="",
        mask_prompts=None,
        tokenizer=None,
        processor=None,
    ):
        assert processor is not None
        self.last_processor = processor
        return self._segment_qwen(image, text, tokenizer)
