"""Word-level slow tokenizer of the tiny Sa2VA stand-in, loaded through ``auto_map`` like the
InternLM2-based Sa2VA checkpoints load their own ``tokenization_internlm2.py``."""

import json
import os
import re

from transformers import PreTrainedTokenizer


class TinySa2VATokenizer(PreTrainedTokenizer):
    """Lower-cased words and punctuation; anything outside ``vocab.json`` maps to ``<unk>``."""

    # Plain class attributes, as transformers' own tokenizers declare them.
    vocab_files_names = {"vocab_file": "vocab.json"}  # noqa: RUF012
    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012

    def __init__(self, vocab_file: str, **kwargs: object) -> None:
        with open(vocab_file, encoding="utf-8") as handle:
            self.vocab: dict[str, int] = json.load(handle)
        self.ids_to_tokens = {index: token for token, index in self.vocab.items()}
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("eos_token", "</s>")
        super().__init__(**kwargs)
        # The special tokens must survive word splitting, as in the real checkpoints.
        self.add_tokens(
            ["<image>", "[SEG]", "<img>", "</img>", "<IMG_CONTEXT>", "<|vision_start|>",
             "<|image_pad|>", "<|vision_end|>"],
            special_tokens=True,
        )  # fmt: skip

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def _tokenize(self, text: str, **kwargs: object) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text.lower())

    def _convert_token_to_id(self, token: str) -> int:
        return self.vocab.get(token, self.vocab["<unk>"])

    def _convert_id_to_token(self, index: int) -> str:
        return self.ids_to_tokens.get(index, "<unk>")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def save_vocabulary(
        self, save_directory: str, filename_prefix: str | None = None
    ) -> tuple[str]:
        path = os.path.join(save_directory, (filename_prefix or "") + "vocab.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.vocab, handle)
        return (path,)
