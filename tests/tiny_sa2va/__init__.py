"""Writes a tiny Sa2VA-like model folder (remote code, safetensors weights, custom tokenizer).

The folder has the layout of a downloaded Sa2VA checkpoint, so ``Sa2VASegmenter`` loads it through
the same ``AutoModel/AutoTokenizer.from_pretrained(..., trust_remote_code=True)`` path as the real
model, offline and in well under a second.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .configuration_tiny_sa2va import TinySa2VAConfig
from .modeling_tiny_sa2va import TinySa2VAModel

SOURCE_DIR = Path(__file__).parent
REMOTE_CODE_FILES = (
    "configuration_tiny_sa2va.py",
    "modeling_tiny_sa2va.py",
    "tokenization_tiny_sa2va.py",
)
VOCAB = (
    "<unk>", "</s>", "<image>", "[SEG]", "please", "segment", "the", "blood", "vessel",
    "vessels", "all", "including", "small", "branches", "thin", "main", "coronary", "arteries",
    "describe", "image", "with", "and", "only", "large", ".", ",",
)  # fmt: skip


def write_tiny_sa2va(
    folder: Path, *, darkness_gain: float = 10.0, extra_code: str = "", **config: Any
) -> Path:
    """Write the model folder into ``folder`` and return it.

    Args:
        folder: target directory (created if missing).
        darkness_gain: logit = gain * (0.5 - local brightness) before the prompt bias, so pixels
            darker than mid-grey are segmented; another gain gives other weights and outputs.
        extra_code: source lines prepended to the modeling file (e.g. an import of a missing
            package, to simulate a checkpoint whose remote code needs an uninstalled extra).
        config: overrides of ``TinySa2VAConfig`` fields (``no_seg_word``, ``grounding_attr``,
            ``post_capture_bias``, ``sam_size``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    model_config = TinySa2VAConfig(vocab_size=len(VOCAB), **config)
    model_config.auto_map = {
        "AutoConfig": "configuration_tiny_sa2va.TinySa2VAConfig",
        "AutoModel": "modeling_tiny_sa2va.TinySa2VAModel",
    }
    model = TinySa2VAModel(model_config)
    _set_weights(model, darkness_gain)
    model.save_pretrained(folder)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(SOURCE_DIR / name, folder / name)
    if extra_code:
        modeling = folder / "modeling_tiny_sa2va.py"
        modeling.write_text(extra_code + "\n" + modeling.read_text())
    _write_tokenizer(folder)
    return folder


def _set_weights(model: TinySa2VAModel, darkness_gain: float) -> None:
    grounding = getattr(model, model.config.grounding_attr)
    conv = grounding.sam2_model.sam_mask_decoder.conv
    with torch.no_grad():
        conv.weight.fill_(-darkness_gain / conv.weight.numel())
        conv.bias.fill_(darkness_gain / 2)
        vocab, dim = model.embed_tokens.weight.shape
        model.embed_tokens.weight.copy_(torch.linspace(-1.0, 1.0, vocab * dim).reshape(vocab, dim))
        model.text_hidden_fcs.weight.fill_(0.1)
        model.text_hidden_fcs.bias.zero_()


def _write_tokenizer(folder: Path) -> None:
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(VOCAB)}))
    tokenizer_config = {
        "tokenizer_class": "TinySa2VATokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_tiny_sa2va.TinySa2VATokenizer", None]},
        "unk_token": "<unk>",
        "eos_token": "</s>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
