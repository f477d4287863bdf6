"""Exporting a fine-tuned Sa2VA head as a model folder upstream's own code loads.

The folder is the base checkpoint's folder with new values for the head's tensors
(``text_hidden_fcs.*`` and ``grounding_encoder.sam2_model.sam_mask_decoder.*``), as upstream's
``tools/convert_to_hf.py`` leaves a fine-tuned model: the remote code, config, tokenizer and
every other file are copied byte for byte; a safetensors shard that holds none of the head's
tensors is copied byte for byte; a shard that holds some is rewritten with the same keys, dtypes,
shapes and metadata, and the same bytes for every other tensor (the index file, if any, is
copied: keys and sizes do not change). ``provenance.json`` names the base and the training.

``AutoModel.from_pretrained(folder, trust_remote_code=True)`` loads it, and so does
``Sa2VASegmenter(folder)`` (``--model-path``); its ``backend_id`` differs from the base's, since
it names the folder and a digest of its files (``provenance.json`` included).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.errors import UserError
from models.sa2va.head import Sa2VAHead, model_folder
from models.sa2va.source import ModelSource, folder_digest, model_files

PROVENANCE = "provenance.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def export_head(
    head: Sa2VAHead, folder: Path, provenance: Mapping[str, Any], base_backend_id: str
) -> Path:
    """Write the checkpoint ``head`` comes from (``head.code``: its source) with ``head``'s
    weights into ``folder``; returns ``folder``. Needs no loaded model (a trial can export
    what it trained); ``base_backend_id`` is recorded as the base's backend id.

    ``provenance`` (JSON-serialisable; e.g. ``data_manifest_sha256``, ``reward_net``,
    ``steps``) is written under ``"training"`` in ``provenance.json``, beside ``"base"`` (source,
    revision, backend id, folder digest, weight file sizes) and ``"head"`` (the checkpoint keys
    written and a sha256 of their new values). The folder is assembled beside ``folder`` and
    renamed into place, so a failed export leaves ``folder`` as it was; a previous export there
    (a folder with ``provenance.json``) is replaced whole.

    Raises:
        UserError: ``folder`` exists, is not empty and is not a previous export, or the base
            has no safetensors weights.
        RuntimeError: a head parameter has no tensor of the same shape in the checkpoint.
    """
    folder = Path(folder)
    if _occupied(folder):
        raise UserError(
            f"export folder '{folder}' exists and holds something other than a previous export "
            f"(no {PROVENANCE}); choose a new folder"
        )
    training = json.loads(json.dumps(dict(provenance)))  # fails early on non-JSON values
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _assemble(staging, head, base_backend_id, training)
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _assemble(staging: Path, head: Sa2VAHead, base_backend_id: str, training: Any) -> None:
    """Copy the base folder into ``staging`` with the head's tensors, plus the provenance."""
    source = head.code[0]
    source_folder = model_folder(source)
    shards = _shards(source_folder)
    updates = _checkpoint_tensors(head)
    for path in model_files(source_folder):
        relative = path.relative_to(source_folder)
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        if relative.as_posix() not in shards:
            shutil.copyfile(path, staging / relative)
    written = _write_shards(source_folder, staging, shards, updates)
    required = {_checkpoint_key(head, name) for name, _ in head.named_parameters()}
    if required - written:
        raise RuntimeError(
            f"head parameters missing from the checkpoint: {sorted(required - written)[:5]}"
        )
    record = {
        "base": _base_record(source, base_backend_id, source_folder, shards),
        "head": {"keys": sorted(written), "sha256": _tensors_sha256(updates, written)},
        "training": training,
    }
    (staging / PROVENANCE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _occupied(folder: Path) -> bool:
    """``folder`` exists with content that is not a previous export."""
    if not folder.exists():
        return False
    return not folder.is_dir() or (any(folder.iterdir()) and not (folder / PROVENANCE).is_file())


def _swap_in(staging: Path, folder: Path) -> None:
    if not folder.exists():
        os.replace(staging, folder)
        return
    previous = folder.with_name(f".{folder.name}.previous-{os.getpid()}")
    os.replace(folder, previous)
    os.replace(staging, folder)
    shutil.rmtree(previous)


def _shards(folder: Path) -> dict[str, list[str]]:
    """Weight file (relative path) -> the tensor keys it holds."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        return shards
    if (folder / SINGLE_FILE).is_file():
        with safe_open(str(folder / SINGLE_FILE), framework="pt") as weights:
            return {SINGLE_FILE: list(weights.keys())}
    raise UserError(
        f"Sa2VA model folder '{folder}' has neither {SINGLE_FILE} nor {INDEX_FILE}; only "
        "safetensors checkpoints can be exported (convert the weights to safetensors first)"
    )


def _checkpoint_key(head: Sa2VAHead, name: str) -> str:
    module, _, rest = name.partition(".")
    return f"{head.checkpoint_prefixes[module]}.{rest}"


def _checkpoint_tensors(head: Sa2VAHead) -> dict[str, torch.Tensor]:
    """The head's state (parameters and persistent buffers) under checkpoint names."""
    return {_checkpoint_key(head, n): t.detach().cpu() for n, t in head.state_dict().items()}


def _write_shards(
    source: Path, target: Path, shards: Mapping[str, list[str]], updates: Mapping[str, torch.Tensor]
) -> set[str]:
    """Copy or rewrite every shard; returns the checkpoint keys that got the head's values."""
    written: set[str] = set()
    for shard, keys in shards.items():
        touched = [k for k in keys if k in updates]
        if not touched:
            shutil.copyfile(source / shard, target / shard)
            continue
        with safe_open(str(source / shard), framework="pt") as weights:
            metadata = weights.metadata()
            tensors = {key: weights.get_tensor(key) for key in weights.keys()}  # noqa: SIM118
        for key in touched:
            old, new = tensors[key], updates[key]
            if old.shape != new.shape:
                raise RuntimeError(
                    f"head tensor {key} has shape {tuple(new.shape)}, the checkpoint's "
                    f"{tuple(old.shape)}; the head does not come from this checkpoint"
                )
            tensors[key] = new.to(old.dtype).contiguous()
        save_file(tensors, str(target / shard), metadata=metadata)
        written.update(touched)
    return written


def _base_record(
    source: ModelSource, backend_id: str, folder: Path, shards: Mapping[str, list[str]]
) -> dict[str, Any]:
    return {
        "location": source.location,
        "revision": source.revision,
        "folder": str(folder),
        "backend_id": backend_id,
        "folder_digest": folder_digest(folder),
        "weight_files": {shard: (folder / shard).stat().st_size for shard in sorted(shards)},
    }


def _tensors_sha256(tensors: Mapping[str, torch.Tensor], keys: set[str]) -> str:
    digest = hashlib.sha256()
    for key in sorted(keys):
        tensor = tensors[key].float().contiguous()
        digest.update(key.encode() + b"\0" + tensor.numpy().tobytes())
    return digest.hexdigest()
