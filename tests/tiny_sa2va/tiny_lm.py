"""What the tiny Sa2VA variants share: a vision encoder, a "language model" with a canned answer
per prompt, and the body of ``predict_forward``, each where upstream has it.

- InternVL-style (v2, v1): ``model.vision_model`` (InternViT) -> ``model.extract_feature``
  (drops the CLS token, ``mlp1``), called from ``model.generate``, which puts the features at
  the ``<IMG_CONTEXT>`` tokens and calls ``model.language_model.generate(inputs_embeds=...,
  generation_config=model.gen_config, ...)``;
- Qwen-VL-style: ``model.model`` (``Qwen2_5_VLForConditionalGeneration``) whose ``generate``
  runs its visual tower ``model.model.model.visual`` (also reachable as ``model.model.visual``)
  through ``get_image_features`` and is called with ``max_new_tokens=2048`` hard-coded;
- both: greedy decoding that honours ``max_new_tokens`` (a longer answer is cut, without EOS),
  causal hidden states returned per step as transformers' ``generate`` does, read out at the
  [SEG] positions with upstream's ``get_seg_hidden_states``, then SAM2 once per [SEG] token.

The vision encoders count their runs (``calls``).
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

VISION_SIZE = 28  # side of the single vision tile
PATCH = 14  # -> (28 / 14) ** 2 = 4 image tokens


class VisionModel(nn.Module):
    """InternViT stand-in: patch embedding plus a CLS token; counts its calls."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.calls = 0

    def forward(self, pixel_values, output_hidden_states=False, return_dict=True):
        self.calls += 1
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(len(patches), -1, -1)
        hidden = torch.cat([cls, patches], dim=1)
        return type("VisionOutput", (), {"last_hidden_state": hidden, "hidden_states": (hidden,)})


class QwenVisual(nn.Module):
    """Qwen-VL visual tower stand-in: flattened patches (n, 3*p*p) and ``grid_thw`` in, one
    embedding per patch out; counts its calls."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * PATCH * PATCH, dim)
        self.spatial_merge_size = 1
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.proj(hidden_states)


class LanguageModel(nn.Module):
    """The LLM stand-in (``language_model`` of InternVL-style Sa2VA): embeddings and greedy
    ``generate`` over ``inputs_embeds``; the answer comes from ``answer_ids`` (set by the Sa2VA
    model when it prepares for generation)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.answer_ids = None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def generate(
        self,
        inputs_embeds,
        attention_mask=None,
        generation_config=None,
        output_hidden_states=None,
        max_new_tokens=None,
        **kwargs,
    ):
        limit = max_new_tokens or getattr(generation_config, "max_new_tokens", None) or 2048
        new_ids, hidden_states = decode(self.embed_tokens, inputs_embeds, self.answer_ids, limit)
        return GenerateDecoderOnlyOutput(sequences=new_ids[None], hidden_states=hidden_states)


class QwenVLModel(nn.Module):
    """``Qwen2_5_VLModel`` stand-in: the visual tower and the token embeddings."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.visual = QwenVisual(dim)
        self.embed_tokens = nn.Embedding(vocab_size, dim)

    def get_image_features(self, pixel_values, image_grid_thw):
        return (self.visual(pixel_values, grid_thw=image_grid_thw),)


class QwenVLForConditionalGeneration(nn.Module):
    """``Qwen2_5_VLForConditionalGeneration`` stand-in: ``generate(input_ids, pixel_values,
    image_grid_thw, ...)`` returns the prompt ids followed by the answer, as transformers does."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.model = QwenVLModel(vocab_size, dim)
        self.answer_ids = None
        self.image_token_id = None

    @property
    def visual(self) -> QwenVisual:
        return self.model.visual

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 max_new_tokens=None, **kwargs):  # fmt: skip
        embeds = self.model.embed_tokens(input_ids)
        (image_embeds,) = self.model.get_image_features(pixel_values, image_grid_thw)
        embeds = embeds.masked_scatter((input_ids == self.image_token_id)[..., None], image_embeds)
        new_ids, hidden = decode(self.model.embed_tokens, embeds, self.answer_ids, max_new_tokens)
        sequences = torch.cat([input_ids[0], new_ids])[None]
        return GenerateDecoderOnlyOutput(sequences=sequences, hidden_states=hidden)


def decode(embed_tokens: nn.Embedding, inputs_embeds, answer_ids, limit: int) -> tuple:
    """Greedy "decoding" of the canned answer: (new ids, at most ``limit`` and ending with EOS
    unless cut; per-step hidden states ``((1, n, dim),)``: the prompt's at the first step, then
    one position per fed-back token). Prompt tokens are read back from their embeddings (image
    features match no row); hidden states are causal means over prompt + fed-back tokens."""
    table = embed_tokens.weight
    prompt = inputs_embeds[0]
    matches = (prompt[:, None, :] == table[None]).all(dim=-1)
    prompt_ids = [int(row.nonzero()[0]) if row.any() else -1 for row in matches]
    new_ids = torch.tensor(answer_ids(prompt_ids)[:limit], device=prompt.device)
    sequence = torch.cat([prompt, embed_tokens(new_ids[:-1]).to(prompt.dtype)])
    steps = torch.arange(1, len(sequence) + 1, device=prompt.device, dtype=sequence.dtype)
    hidden = sequence.cumsum(dim=0) / steps[:, None]
    n = len(prompt)
    fed_back = [(hidden[n + i : n + i + 1][None],) for i in range(len(new_ids) - 1)]
    return new_ids, ((hidden[:n][None],), *fed_back)


def get_seg_hidden_states(hidden_states, output_ids, seg_id):
    """Upstream's read-out: hidden states where the generated token fed back in is [SEG]."""
    seg_mask = output_ids == seg_id
    n_out = len(seg_mask)
    if n_out == 0:
        return hidden_states[0:0]
    return hidden_states[-n_out:][seg_mask]


class TinySa2VAMixin:
    """Builds the modules and runs the part of ``predict_forward`` all generations share."""

    def _build(self, config, grounding_class, qwen: bool = False) -> None:
        if qwen:
            self.model = QwenVLForConditionalGeneration(config.vocab_size, config.embed_dim)
        else:
            self.vision_model = VisionModel(config.embed_dim)
            self.mlp1 = nn.Sequential(nn.Linear(config.embed_dim, config.embed_dim))
            self.language_model = LanguageModel(config.vocab_size, config.embed_dim)
        self.text_hidden_fcs = nn.Linear(config.embed_dim, 1)
        setattr(self, config.grounding_attr, grounding_class(config.sam_size))
        self.init_prediction_config = False
        self.torch_dtype = torch.bfloat16
        self.last_image_size = None
        self.last_answer = None

    def _answer_ids(self, prompt_ids: list) -> list:
        """The canned answer to the prompt's words, as token ids ending with EOS."""
        tokenizer = self.tokenizer
        words = set(prompt_ids)
        if tokenizer.convert_tokens_to_ids(self.config.no_seg_word) in words:
            answer = "It is an angiogram."
        elif tokenizer.convert_tokens_to_ids(self.config.two_seg_word) in words:
            answer = "Sure, [SEG] and [SEG]."
        else:
            answer = "Sure, [SEG]."
        return [*tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]

    def _segment_qwen(self, image, text: str, tokenizer) -> dict:
        """Qwen-VL-style: the "processor" part (patches, grid, image pad tokens), then
        ``model.generate`` with upstream's hard-coded ``max_new_tokens=2048``."""
        self.seg_token_idx = tokenizer.convert_tokens_to_ids("[SEG]")
        self.tokenizer = tokenizer
        self.model.answer_ids = self._answer_ids
        self.model.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        tile = _vision_tile(image).to(self.device, self.torch_dtype)
        side = VISION_SIZE // PATCH
        patches = tile.reshape(side, PATCH, side, PATCH, 3).permute(0, 2, 4, 1, 3)
        pixel_values = patches.reshape(side * side, 3 * PATCH * PATCH)
        grid_thw = torch.tensor([[1, side, side]], device=self.device)
        text = text.replace("<image>", "")
        text = "<|vision_start|>" + "<|image_pad|>" * side * side + "<|vision_end|>" + text
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])[None]
        output = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=torch.ones_like(ids),
            pixel_values=pixel_values, image_grid_thw=grid_thw, max_new_tokens=2048,
            do_sample=False, output_hidden_states=True, return_dict_in_generate=True,
        )  # fmt: skip
        return self._masks(image, output, output.sequences[0][ids.shape[1] :], tokenizer)

    # --- shared: [SEG] read-out and SAM2 --------------------------------------------------------
    def _masks(self, image, output, new_ids, tokenizer) -> dict:
        self.last_image_size = image.size
        predict = tokenizer.decode(new_ids, skip_special_tokens=False).strip()
        self.last_answer = predict
        last_hidden_states = torch.cat([item[-1][0] for item in output.hidden_states], dim=0)
        seg_hidden_states = get_seg_hidden_states(
            last_hidden_states, new_ids[:-1], self.seg_token_idx
        )
        all_seg_hidden_states = self.text_hidden_fcs(seg_hidden_states)
        grounding = getattr(self, self.config.grounding_attr)
        size = self.config.sam_size
        g_image = np.array(image.resize((size, size)))  # squashed, aspect ratio ignored
        g_image = torch.from_numpy(g_image).permute(2, 0, 1).contiguous().to(self.device)
        g_pixel_values = torch.stack([grounding.preprocess_image(g_image, self.torch_dtype)])
        ret_masks = []
        for seg_hidden in all_seg_hidden_states:
            sam_states = grounding.get_sam2_embeddings(g_pixel_values)
            pred_masks = grounding.language_embd_inference(sam_states, [seg_hidden[None]])
            pred_masks = pred_masks + self.config.post_capture_bias
            w, h = image.size
            masks = F.interpolate(pred_masks, size=(h, w), mode="bilinear", align_corners=False)
            masks = masks[:, 0].sigmoid() > 0.5
            ret_masks.append(masks.cpu().numpy())
        return {"prediction": predict, "prediction_masks": ret_masks}


class InternVLMixin(TinySa2VAMixin):
    """The InternVL-style (v2, v1) part: ``extract_feature``, ``generate``, the prompt's image
    tokens; the Qwen-VL-style model has none of these, as upstream."""

    def _prepare_internvl(self, tokenizer, max_new_tokens: int, torch_dtype) -> None:
        self.tokenizer = tokenizer
        self.gen_config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        self.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        self.seg_token_idx = tokenizer.convert_tokens_to_ids("[SEG]")
        self.language_model.answer_ids = self._answer_ids
        self.torch_dtype = torch_dtype
        self.init_prediction_config = True

    def extract_feature(self, pixel_values):
        vit_embeds = self.vision_model(
            pixel_values=pixel_values, output_hidden_states=False, return_dict=True
        ).last_hidden_state
        return self.mlp1(vit_embeds[:, 1:, :])

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None,
                 visual_features=None, generation_config=None, output_hidden_states=None,
                 return_dict=None, **generate_kwargs):  # fmt: skip
        vit_embeds = visual_features
        if vit_embeds is None:
            vit_embeds = self.extract_feature(pixel_values.to(self.device))
        input_embeds = self.language_model.get_input_embeddings()(input_ids)
        batch, length, dim = input_embeds.shape
        input_embeds = input_embeds.reshape(batch * length, dim)
        selected = input_ids.reshape(batch * length) == self.img_context_token_id
        input_embeds[selected] = vit_embeds.reshape(-1, dim).to(input_embeds.dtype)
        return self.language_model.generate(
            inputs_embeds=input_embeds.reshape(batch, length, dim),
            attention_mask=attention_mask,
            generation_config=generation_config,
            output_hidden_states=output_hidden_states,
            use_cache=True,
            **generate_kwargs,
        )

    def _segment_internvl(self, image, text: str, tokenizer) -> dict:
        pixel_values = _vision_tile(image).permute(2, 0, 1)[None].to(self.device, self.torch_dtype)
        tokens = (VISION_SIZE // PATCH) ** 2
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * tokens + "</img>")
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])[None]
        output = self.generate(
            pixel_values=pixel_values, input_ids=ids.to(self.device),
            attention_mask=torch.ones_like(ids, dtype=torch.bool),
            generation_config=self.gen_config, output_hidden_states=True,
            return_dict_in_generate=True,
        )  # fmt: skip
        return self._masks(image, output, output.sequences[0], tokenizer)


def _vision_tile(image) -> torch.Tensor:
    """The image as one (VISION_SIZE, VISION_SIZE, 3) float tile in [0, 1]."""
    tile = np.asarray(image.convert("RGB").resize((VISION_SIZE, VISION_SIZE)), np.float32)
    return torch.from_numpy(tile / 255.0)
