"""Device and dtype rules for Sa2VA.

Sa2VA's remote code hard-codes ``.cuda()`` and ``torch.device("cuda")`` and puts tensors on the
*current* CUDA device, so:

- ``"auto"`` means the current CUDA device and never falls back to the CPU: without CUDA it is
  refused with a message saying so.
- ``"cuda"`` is the current device, ``"cuda:N"`` device N; :func:`use_device` makes it current
  (``torch.cuda.set_device``) for loading and for every call.
- ``"cpu"`` is accepted only when asked for explicitly, for debugging with remote code that does
  not hard-code CUDA (the test fixtures); it is slow and logs a warning. A checkpoint whose code
  hard-codes CUDA is refused on the CPU by the preflight (``generations.preflight``).
- bfloat16 (the GPU default) and float16 run only on CUDA: on the CPU the SAM2 memory path fails
  without CUDA autocast, so they are refused there; the CPU default is float32.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from models.errors import UserError

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
CPU_WARNING = (
    "Sa2VA on device 'cpu': for debugging only (very slow; checkpoints whose remote code "
    "hard-codes CUDA cannot run there). Use a CUDA GPU for real runs."
)


def resolve_device(device: str) -> torch.device:
    """``"auto"``/``"cuda"`` (current CUDA device), ``"cuda:N"``, or an explicit ``"cpu"``.

    Raises:
        UserError: an unknown name, no CUDA for ``auto``/``cuda``, or N beyond the visible GPUs.
    """
    if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
        raise UserError(f"device {device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")
    if device == "cpu":
        logger.warning(CPU_WARNING)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            f"Sa2VA needs a CUDA GPU, and device {device!r} found none: torch "
            f"{torch.__version__} sees no CUDA device (a CPU-only torch build, no driver, or "
            "CUDA_VISIBLE_DEVICES empty). Sa2VA's remote code hard-codes CUDA, so 'auto' never "
            "falls back to the CPU. Install a CUDA build of torch on a GPU machine, or set "
            "backend.device: cpu explicitly to debug with a model whose code supports it (slow)."
        )
    count = torch.cuda.device_count()
    index = int(device.partition(":")[2]) if ":" in device else torch.cuda.current_device()
    if index >= count:
        raise UserError(
            f"device {device!r}: only {count} CUDA device(s) are visible (cuda:0..cuda:"
            f"{count - 1}; check CUDA_VISIBLE_DEVICES)"
        )
    return torch.device("cuda", index)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``None`` is bfloat16 on CUDA and float32 on the CPU; half types only on CUDA."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"Sa2VA dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if device.type != "cuda" and dtype != "float32":
        raise UserError(
            f"Sa2VA dtype {dtype!r} runs only on CUDA (its SAM2 path relies on CUDA autocast); "
            "on device 'cpu' use dtype 'float32' (the default there)"
        )
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@contextmanager
def use_device(device: torch.device) -> Iterator[None]:
    """Make ``device`` the current CUDA device while the block runs (upstream code allocates on
    the current device); restores the previous one. A no-op for the CPU."""
    if device.type != "cuda" or device.index is None:
        yield
        return
    previous = torch.cuda.current_device()
    torch.cuda.set_device(device.index)
    try:
        yield
    finally:
        torch.cuda.set_device(previous)
