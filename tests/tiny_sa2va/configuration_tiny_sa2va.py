"""Config of the tiny Sa2VA stand-in (remote code copied into a model folder by the tests)."""

from transformers import PretrainedConfig


class TinySa2VAConfig(PretrainedConfig):
    """Knobs of the tiny model; every one mirrors a way a real checkpoint can behave.

    Args:
        sam_size: side of the square "grounding" input (1024 in the real SAM2 path).
        embed_dim: width of the token embeddings and of the [SEG] hidden state.
        no_seg_word: a prompt containing this word gets an answer without [SEG] (and no mask).
        grounding_attr: attribute name of the SAM2-like submodule. The real model calls it
            ``grounding_encoder``; another name simulates a checkpoint the soft-mask capture
            cannot find.
        post_capture_bias: added to the logits after ``language_embd_inference`` returns, before
            the model thresholds them; non-zero simulates a model whose mask no longer follows
            the captured logits (the segmenter must notice and drop ``prob``).
    """

    model_type = "tiny_sa2va"

    def __init__(
        self,
        sam_size: int = 64,
        embed_dim: int = 8,
        vocab_size: int = 32,
        no_seg_word: str = "describe",
        grounding_attr: str = "grounding_encoder",
        post_capture_bias: float = 0.0,
        **kwargs: object,
    ) -> None:
        self.sam_size = sam_size
        self.embed_dim = embed_dim
        self.vocab_size = vocab_size
        self.no_seg_word = no_seg_word
        self.grounding_attr = grounding_attr
        self.post_capture_bias = post_capture_bias
        super().__init__(**kwargs)
