"""v1 config of the tiny Sa2VA stand-in (copied into a folder as ``configuration_sa2va_chat.py``).

Like magic-research/Sa2VA's ``Sa2VAChatConfig`` it reads ``llm_config["architectures"]`` without
a default, so it cannot be built without arguments: transformers >= 4.52 builds the config class
bare (``to_diff_dict``) while loading and fails with ``KeyError: 'architectures'``."""

from transformers import PretrainedConfig


class Sa2VAChatConfig(PretrainedConfig):
    """Knobs of the tiny model; every one mirrors a way a real checkpoint can behave.

    Args:
        llm_config: the language model's sub-config (``{"architectures": [...]}``).
        sam_size: side of the square grounding input and of the logits SAM2 returns (1024).
        embed_dim: width of the token embeddings and of the [SEG] hidden state.
        no_seg_word: a prompt containing this word gets an answer without [SEG] (and no mask).
        two_seg_word: a prompt containing this word gets an answer with two [SEG] tokens.
        grounding_attr: attribute name of the SAM2 wrapper (``grounding_encoder`` in the real
            model; another name simulates a layout the soft-mask capture cannot find).
        post_capture_bias: added to the logits after ``language_embd_inference`` returns, before
            thresholding; non-zero simulates a model whose mask no longer follows the capture.
    """

    model_type = "sa2va_chat"

    def __init__(
        self,
        llm_config: dict | None = None,
        sam_size: int = 1024,
        embed_dim: int = 8,
        vocab_size: int = 32,
        no_seg_word: str = "describe",
        two_seg_word: str = "both",
        grounding_attr: str = "grounding_encoder",
        post_capture_bias: float = 0.0,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        llm_config = {} if llm_config is None else llm_config
        self.llm_architecture = llm_config["architectures"][0]
        self.llm_config = llm_config
        self.sam_size = sam_size
        self.embed_dim = embed_dim
        self.vocab_size = vocab_size
        self.no_seg_word = no_seg_word
        self.two_seg_word = two_seg_word
        self.grounding_attr = grounding_attr
        self.post_capture_bias = post_capture_bias
