"""The "language model" shared by the tiny Sa2VA variants: a canned answer per prompt and
causal hidden states, read out at the [SEG] positions the way Sa2VA's ``predict_forward`` does
(``get_seg_hidden_states`` over the generated ids minus the final EOS)."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TinySa2VAMixin:
    """Builds the modules and runs the part of ``predict_forward`` all generations share."""

    def _build(self, config, grounding_class) -> None:
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim)
        self.text_hidden_fcs = nn.Linear(config.embed_dim, 1)
        setattr(self, config.grounding_attr, grounding_class(config.sam_size))
        self.init_prediction_config = False
        self.torch_dtype = torch.bfloat16
        self.last_image_size = None
        self.last_answer = None

    def _answer(self, prompt_ids: list, tokenizer) -> str:
        words = set(prompt_ids)
        if tokenizer.convert_tokens_to_ids(self.config.no_seg_word) in words:
            return "It is an angiogram."
        if tokenizer.convert_tokens_to_ids(self.config.two_seg_word) in words:
            return "Sure, [SEG] and [SEG]."
        return "Sure, [SEG]."

    def _generate(self, prompt_ids: list, tokenizer) -> tuple:
        """(generated ids ending with EOS, last-layer hidden states of prompt + generated)."""
        answer = self._answer(prompt_ids, tokenizer)
        output_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        output_ids = torch.tensor([*output_ids, tokenizer.eos_token_id], device=self.device)
        inputs = torch.cat([torch.tensor(prompt_ids, device=self.device), output_ids[:-1]])
        embeddings = self.embed_tokens(inputs)
        steps = torch.arange(1, len(inputs) + 1, device=self.device, dtype=embeddings.dtype)
        hidden = embeddings.cumsum(dim=0) / steps[:, None]
        return output_ids, hidden

    def _segment(self, image, text: str, tokenizer) -> dict:
        self.last_image_size = image.size
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        output_ids, hidden = self._generate(prompt_ids, tokenizer)
        predict = tokenizer.decode(output_ids, skip_special_tokens=False).strip()
        self.last_answer = predict
        ret_masks = []
        seg_hidden_states = get_seg_hidden_states(hidden, output_ids[:-1], self.seg_token_idx)
        all_seg_hidden_states = self.text_hidden_fcs(seg_hidden_states)
        grounding = getattr(self, self.config.grounding_attr)
        size = self.config.sam_size
        g_image = np.array(image.resize((size, size)))  # squashed, aspect ratio ignored
        g_image = torch.from_numpy(g_image).permute(2, 0, 1).contiguous().to(self.device)
        g_pixel_values = torch.stack([grounding.preprocess_image(g_image, self.torch_dtype)])
        for seg_hidden in all_seg_hidden_states:
            sam_states = grounding.get_sam2_embeddings(g_pixel_values)
            pred_masks = grounding.language_embd_inference(sam_states, [seg_hidden[None]])
            pred_masks = pred_masks + self.config.post_capture_bias
            w, h = image.size
            masks = F.interpolate(pred_masks, size=(h, w), mode="bilinear", align_corners=False)
            masks = masks[:, 0].sigmoid() > 0.5
            ret_masks.append(masks.cpu().numpy())
        return {"prediction": predict, "prediction_masks": ret_masks}


def get_seg_hidden_states(hidden_states, generated_inputs, seg_id):
    """Hidden states at the positions where the generated token fed back in is [SEG]."""
    if len(generated_inputs) == 0:
        return hidden_states[:0]
    tail = hidden_states[len(hidden_states) - len(generated_inputs) :]
    return tail[generated_inputs == seg_id]
