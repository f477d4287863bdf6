"""How many parameters a Sa2VA checkpoint holds, read from its folder without loading it.

The GPU memory plan (``orchestrator.gpu.budget``) takes a worker's weights from here rather
than from a declared size, so a folder bigger than declared is planned at its real size. What
is read, in order (the first that exists decides):

1. ``model.safetensors.index.json``: ``metadata.total_size`` (bytes of all tensors), divided by
   the bytes per element of the dtype on disk: ``config.json``'s ``torch_dtype`` (or ``dtype``),
   else the dtype of the first shard present, else 2 (bfloat16, how Sa2VA is released; an
   unknown dtype can only over-count a float32 folder, which errs on the safe side);
2. ``*.safetensors`` files: their headers (the tensors' dtypes and shapes), exactly;
3. ``pytorch_model.bin.index.json``'s ``total_size``, else the ``*.bin`` files' sizes, divided
   like 1.

Only headers and JSON files are read (a few KB), never the weights. The loaded size then
follows from the dtype the worker loads in (``loaded_bytes``): bfloat16 on CUDA, float32 on the
CPU (see ``models.sa2va.devices``), whatever the folder stores. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
"""Bytes per element of the dtypes a config names (``torch_dtype``) or a worker loads in."""
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
SAFETENSORS_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MAX_HEADER_BYTES = 100 * 2**20
"""A safetensors header larger than this is a damaged file, not a model."""
RELEASE_DTYPE = "bfloat16"


@dataclass(frozen=True)
class CheckpointWeights:
    """The weights of a model folder.

    Attributes:
        folder: the folder read.
        parameters: tensor elements (the parameter count, buffers included).
        disk_bytes: bytes of the tensors on disk.
        disk_dtype: the dtype on disk (``"bfloat16"``; ``"mixed"`` for several).
        source: what the figures were read from, for messages.
    """

    folder: str
    parameters: int
    disk_bytes: int
    disk_dtype: str
    source: str

    def loaded_bytes(self, dtype: str) -> int:
        """Bytes of the weights once loaded in ``dtype`` (``"bfloat16"``, ``"float32"``...)."""
        return self.parameters * DTYPE_BYTES[dtype]

    def describe(self) -> str:
        """``8.30 B parameters (15.5 GB in bfloat16 on disk, from ...)``, for messages."""
        return (
            f"{self.parameters / 1e9:.2f} B parameters ({self.disk_bytes / 2**30:.1f} GB in "
            f"{self.disk_dtype} on disk, from {self.source})"
        )


def loaded_dtype(device: str | None) -> str:
    """The dtype a worker loads Sa2VA in on ``device`` (``backend.device``): float32 on the
    CPU, bfloat16 on CUDA (``models.sa2va.devices.resolve_dtype``'s defaults)."""
    return "float32" if device == "cpu" else "bfloat16"


def read_weights(folder: str | os.PathLike[str]) -> CheckpointWeights | None:
    """The weights of the model folder ``folder``, or None when it holds no weight files.

    Raises:
        UserError: an index without ``metadata.total_size``, or a damaged safetensors header
            (naming the file).
    """
    root = Path(folder)
    if (root / SAFETENSORS_INDEX).is_file():
        total = _index_total(root / SAFETENSORS_INDEX)
        return _from_total(root, total, f"{SAFETENSORS_INDEX} metadata.total_size")
    shards = sorted(root.glob("*.safetensors"))
    if shards:
        return _from_headers(root, shards)
    if (root / BIN_INDEX).is_file():
        return _from_total(root, _index_total(root / BIN_INDEX), f"{BIN_INDEX} total_size")
    bins = sorted(root.glob("*.bin"))
    if bins:
        total = sum(path.stat().st_size for path in bins)
        return _from_total(root, total, f"the sizes of {len(bins)} .bin file(s)")
    return None


def read_model_weights(model_path: str, revision: str | None = None) -> CheckpointWeights | None:
    """:func:`read_weights` of a local folder, or of a Hub id's snapshot already in the Hugging
    Face cache (at ``revision``); None when neither is on this machine."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        return read_weights(path)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model_path, "config.json", revision=revision)
    return read_weights(Path(cached).parent) if isinstance(cached, str) else None


def _index_total(index: Path) -> int:
    try:
        total = json.loads(index.read_text())["metadata"]["total_size"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"{index}: cannot read metadata.total_size ({err!r}); the download is incomplete "
            "or damaged. Download the checkpoint again."
        ) from None
    if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
        raise UserError(f"{index}: metadata.total_size is {total!r}, not a positive byte count")
    return total


def _from_total(root: Path, total: int, source: str) -> CheckpointWeights:
    dtype = _config_dtype(root) or _first_shard_dtype(root) or RELEASE_DTYPE
    per_element = DTYPE_BYTES.get(dtype, DTYPE_BYTES[RELEASE_DTYPE])
    return CheckpointWeights(str(root), total // per_element, total, dtype, source)


def _from_headers(root: Path, shards: list[Path]) -> CheckpointWeights:
    parameters = disk_bytes = 0
    dtypes: set[str] = set()
    for shard in shards:
        for name, tensor in _header(shard).items():
            if name == "__metadata__":
                continue
            count = 1
            for side in tensor["shape"]:
                count *= int(side)
            parameters += count
            disk_bytes += count * SAFETENSORS_DTYPE_BYTES.get(tensor["dtype"], 4)
            dtypes.add(SAFETENSORS_DTYPE_NAMES.get(tensor["dtype"], tensor["dtype"]))
    dtype = dtypes.pop() if len(dtypes) == 1 else "mixed"
    source = f"the headers of {len(shards)} .safetensors file(s)"
    return CheckpointWeights(str(root), parameters, disk_bytes, dtype, source)


def _header(shard: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: 8 bytes of length (little-endian), then JSON."""
    try:
        with shard.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"header length {length} bytes")
            header = json.loads(file.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return header
    except (OSError, ValueError, struct.error) as err:
        raise UserError(
            f"{shard}: not a readable safetensors file ({err}); the download is incomplete or "
            "damaged. Download the checkpoint again."
        ) from None


def _config_dtype(root: Path) -> str | None:
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return None
    dtype = config.get("torch_dtype") or config.get("dtype") if isinstance(config, dict) else None
    return dtype if dtype in DTYPE_BYTES else None


def _first_shard_dtype(root: Path) -> str | None:
    shard = next(iter(sorted(root.glob("*.safetensors"))), None)
    if shard is None:
        return None
    codes = {t["dtype"] for name, t in _header(shard).items() if name != "__metadata__"}
    return SAFETENSORS_DTYPE_NAMES.get(codes.pop()) if len(codes) == 1 else None
