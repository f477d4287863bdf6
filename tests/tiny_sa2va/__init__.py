"""Writes tiny Sa2VA-like model folders (remote code, safetensors weights, custom tokenizer).

Three variants with the structure of the real remote code (see each file's docstring):

- ``"v2"``: bytedance/Sa2VA InternVL-style ``Sa2VAChatModel`` (the current checkpoints);
- ``"qwen"``: bytedance/Sa2VA Qwen-VL-style ``Sa2VAChatModelQwen`` (asserts a processor);
- ``"v1"``: magic-research/Sa2VA ``Sa2VAChatModel`` (config needs arguments, no ``processor``).

A folder has the layout of a downloaded checkpoint, so ``Sa2VASegmenter`` loads it through the
same ``AutoModel/AutoTokenizer.from_pretrained(..., trust_remote_code=True)`` path, offline and
in about a second. Give each variant its own folder name: transformers caches remote code by the
folder's name.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

SOURCE_DIR = Path(__file__).parent
# Per variant: (model class, config class, files copied as {name in folder: source file}).
VARIANTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "v2": (
        "modeling_sa2va_chat.Sa2VAChatModel",
        "configuration_sa2va_chat.Sa2VAChatConfig",
        {
            "configuration_sa2va_chat.py": "configuration_sa2va_chat.py",
            "modeling_sa2va_chat.py": "modeling_sa2va_chat.py",
        },
    ),
    "qwen": (
        "modeling_sa2va_qwen.Sa2VAChatModelQwen",
        "configuration_sa2va_chat.Sa2VAChatConfigQwen",
        {
            "configuration_sa2va_chat.py": "configuration_sa2va_chat_qwen.py",
            "modeling_sa2va_qwen.py": "modeling_sa2va_qwen.py",
        },
    ),
    "v1": (
        "modeling_sa2va_chat.Sa2VAChatModel",
        "configuration_sa2va_chat.Sa2VAChatConfig",
        {
            "configuration_sa2va_chat.py": "configuration_sa2va_chat_v1.py",
            "modeling_sa2va_chat.py": "modeling_sa2va_chat_v1.py",
        },
    ),
}
SHARED_FILES = ("sam2.py", "tiny_lm.py", "tokenization_tiny_sa2va.py")
VOCAB = (
    "<unk>", "</s>", "<image>", "[SEG]", "please", "segment", "the", "blood", "vessel",
    "vessels", "all", "including", "small", "branches", "thin", "main", "coronary", "arteries",
    "describe", "image", "with", "and", "only", "large", "both", "sure", "it", "is", "an",
    "angiogram", ".", ",", "<img>", "</img>", "<IMG_CONTEXT>", "<|vision_start|>",
    "<|image_pad|>", "<|vision_end|>",
)  # fmt: skip
# Candidate weights of the IoU head: the unshifted candidate (index 1) has the largest IoU.
IOU_WEIGHTS = (0.3, 1.0, 0.6)


def write_tiny_sa2va(
    folder: Path,
    *,
    variant: str = "v2",
    darkness_gain: float = 10.0,
    extra_code: str = "",
    **config: Any,
) -> Path:
    """Write a model folder into ``folder`` and return it.

    Args:
        folder: target directory (created if missing).
        variant: ``"v2"``, ``"qwen"`` or ``"v1"`` (module doc).
        darkness_gain: logit = gain * (0.5 - local brightness) before the prompt bias, so pixels
            darker than mid-grey are segmented; another gain gives other weights and outputs.
        extra_code: source lines prepended to the modeling file (e.g. an import of a missing
            package, to simulate remote code that needs an uninstalled package).
        config: overrides of the config fields (``no_seg_word``, ``two_seg_word``,
            ``grounding_attr``, ``post_capture_bias``, ``sam_size``).
    """
    model_ref, config_ref, files = VARIANTS[variant]
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in {**files, **{f: f for f in SHARED_FILES}}.items():
        shutil.copyfile(SOURCE_DIR / source, folder / name)
    fields = {"llm_config": {"architectures": ["TinyLM"]}, "vocab_size": len(VOCAB), **config}
    with _code_of(folder) as load:
        model_config = load(config_ref)(**fields)
        model = load(model_ref)(model_config)
    _set_weights(model, darkness_gain)
    save_file(model.state_dict(), str(folder / "model.safetensors"), metadata={"format": "pt"})
    # Written by hand: a v1 config cannot be serialised by transformers >= 4.52 (to_diff_dict
    # builds the class without arguments).
    payload = {
        "architectures": [model_ref.rpartition(".")[2]],
        "auto_map": {"AutoConfig": config_ref, "AutoModel": model_ref},
        "model_type": "sa2va_chat",
        "torch_dtype": "float32",
        **{k: v for k, v in vars(model_config).items() if k in _FIELDS},
    }
    (folder / "config.json").write_text(json.dumps(payload, indent=2))
    if extra_code:
        modeling = folder / f"{model_ref.rpartition('.')[0]}.py"
        modeling.write_text(extra_code + "\n" + modeling.read_text())
    _write_tokenizer(folder)
    return folder


def build_from_folder(folder: Path) -> torch.nn.Module:
    """The folder's model built from its own code and weights without transformers' loader
    (which refuses the v1 config class on transformers >= 4.52): for tests of the model itself
    on every variant. The code stays imported while the model lives."""
    payload = json.loads((folder / "config.json").read_text())
    fields = {k: v for k, v in payload.items() if k in _FIELDS}
    auto_map = payload["auto_map"]
    with _code_of(folder, forget=False) as load:
        model = load(auto_map["AutoModel"])(load(auto_map["AutoConfig"])(**fields))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


_FIELDS = (
    "llm_config", "sam_size", "embed_dim", "vocab_size", "no_seg_word", "two_seg_word",
    "grounding_attr", "post_capture_bias",
)  # fmt: skip


@contextmanager
def _code_of(folder: Path, forget: bool = True) -> Iterator[Callable[[str], Any]]:
    """Import ``module.Class`` references from the folder's own code files (as one package, so
    their relative imports resolve as in the checkpoint); forgotten afterwards if ``forget``."""
    package = f"_tiny_sa2va_code_{next(_PACKAGES)}"
    spec = importlib.util.spec_from_loader(package, loader=None, is_package=True)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__path__ = [str(folder)]
    sys.modules[package] = module
    try:
        yield lambda ref: getattr(
            importlib.import_module(f"{package}.{ref.rpartition('.')[0]}"), ref.rpartition(".")[2]
        )
    finally:
        imported = [n for n in sys.modules if n == package or n.startswith(package + ".")]
        for name in imported if forget else []:
            del sys.modules[name]


_PACKAGES = itertools.count()


def _set_weights(model: torch.nn.Module, darkness_gain: float) -> None:
    grounding = getattr(model, model.config.grounding_attr)
    decoder = grounding.sam2_model.sam_mask_decoder
    with torch.no_grad():
        per_channel = decoder.conv.weight[0].numel()
        decoder.conv.weight.fill_(-darkness_gain / per_channel)
        decoder.conv.bias.fill_(darkness_gain / 2)
        decoder.iou_prediction_head.weight.copy_(torch.diag(torch.tensor(IOU_WEIGHTS)))
        decoder.iou_prediction_head.bias.zero_()
        for weight in _image_encoder_weights(model):
            weight.copy_(torch.linspace(-0.05, 0.05, weight.numel()).reshape(weight.shape))
        embed_tokens = _embed_tokens(model)
        vocab, dim = embed_tokens.weight.shape
        embed_tokens.weight.copy_(torch.linspace(-1.0, 1.0, vocab * dim).reshape(vocab, dim))
        model.text_hidden_fcs.weight.fill_(0.1)
        model.text_hidden_fcs.bias.zero_()


def _image_encoder_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    if hasattr(model, "vision_model"):
        return [model.vision_model.patch_embed.weight, model.mlp1[0].weight]
    return [model.model.model.visual.proj.weight]


def _embed_tokens(model: torch.nn.Module) -> torch.nn.Embedding:
    if hasattr(model, "language_model"):
        return model.language_model.embed_tokens
    return model.model.model.embed_tokens


def _write_tokenizer(folder: Path) -> None:
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(VOCAB)}))
    tokenizer_config = {
        "tokenizer_class": "TinySa2VATokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_tiny_sa2va.TinySa2VATokenizer", None]},
        "unk_token": "<unk>",
        "eos_token": "</s>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
