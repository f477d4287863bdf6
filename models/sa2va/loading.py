"""Loading a Sa2VA checkpoint: the preflight run before any worker starts, ``from_pretrained``
with load errors translated into what the user must do, and the Qwen processor."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch

from models.errors import UserError
from models.sa2va import generations as gen
from models.sa2va import remote_code
from models.sa2va.devices import resolve_device
from models.sa2va.source import DOWNLOAD_HINT, ModelSource

logger = logging.getLogger(__name__)


def preflight(
    model_path: str | os.PathLike[str],
    revision: str | None = None,
    allow_unpinned_remote_code: bool = False,
    device: str | None = "auto",
    environment: bool = True,
) -> gen.Checkpoint | None:
    """Everything that can be refused before a worker starts, without loading weights.

    Checks the source rules (:class:`ModelSource`), the device (``None`` skips it: on a cluster
    the driver's node may have no GPU), and for a local folder its remote-code generation against
    the installed transformers, the packages its code imports, and CUDA-only code on the CPU.
    ``environment=False`` (the workers run in a Ray runtime_env of their own) reads the folder
    but leaves transformers and the packages to the workers' own check. Returns what the folder's
    code was read as (``None`` for a Hub id, read after download).

    Raises:
        UserError: naming the generation, the transformers version and range, and the command.
    """
    source = ModelSource.resolve(model_path, revision, allow_unpinned_remote_code)
    device_type = resolve_device(device).type if device is not None else "cuda"
    if not environment:
        return gen.inspect_folder(Path(source.location)) if source.is_local else None
    return check_source(source, device_type)


def check_source(source: ModelSource, device_type: str) -> gen.Checkpoint | None:
    """:func:`preflight` for a resolved source and device type."""
    if not source.is_local:
        return None
    checkpoint = gen.inspect_folder(Path(source.location))
    gen.check_environment(checkpoint, device_type)
    return checkpoint


def load_model(
    source: ModelSource, checkpoint: gen.Checkpoint | None, dtype: torch.dtype, device: torch.device
) -> tuple[Any, Any]:
    """``AutoModel``/``AutoTokenizer.from_pretrained``, with import/attribute/key errors from a
    transformers mismatch turned into a UserError.

    The remote code comes from the checkpoint's own module directory and is copied and imported
    under an inter-process lock (:mod:`models.sa2va.remote_code`); the weights load after it, in
    parallel with other workers. On CUDA they load straight onto ``device``
    (``device_map={"": device}``, which needs accelerate: the preflight requires it there), so
    workers sharing a host never hold a CPU copy of the model; on the CPU they load where they
    are used."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    location, kwargs = remote_code.code_location(source), source.load_kwargs()
    placement = {"device_map": {"": device}} if device.type == "cuda" else {}
    try:
        with remote_code.code_lock(location):
            config = AutoConfig.from_pretrained(location, **kwargs)
            _import_model_class(config, location, kwargs)
            tokenizer = AutoTokenizer.from_pretrained(location, use_fast=False, **kwargs)
        model = AutoModel.from_pretrained(
            location, config=config, low_cpu_mem_usage=True, **{_dtype_kwarg(): dtype},
            **placement, **kwargs,
        )  # fmt: skip
    except ImportError as exc:
        missing = gen.missing_from_error(exc)
        if missing:
            raise gen.missing_packages(source.location, missing) from exc
        raise _mismatch(source, checkpoint, exc) from exc
    except (AttributeError, KeyError) as exc:
        raise _mismatch(source, checkpoint, exc) from exc
    except OSError as exc:
        raise UserError(
            f"could not load Sa2VA from the {source.describe()}: {exc}. {DOWNLOAD_HINT}"
        ) from exc
    return model, tokenizer


def _import_model_class(config: Any, location: str, kwargs: dict[str, Any]) -> None:
    """Copy and import the model's code (what ``AutoModel`` would, here under the lock)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    reference = (getattr(config, "auto_map", None) or {}).get("AutoModel")
    if reference:
        get_class_from_dynamic_module(reference, location, **kwargs)


def _mismatch(source: ModelSource, checkpoint: gen.Checkpoint | None, exc: Exception) -> UserError:
    return gen.version_mismatch(source.describe(), checkpoint, gen.installed_transformers(), exc)


def prepare_generation(model: Any, tokenizer: Any, dtype: torch.dtype) -> None:
    """Prepare the model for ``predict_forward`` in ``dtype``.

    The remote code prepares itself lazily on the first ``predict_forward`` and then casts to
    bfloat16 (v1) unless told otherwise; preparing here keeps ``dtype``. The Qwen-based code
    casts its grounding inputs to ``model.torch_dtype``.
    """
    prepare = getattr(model, "preparing_for_generation", None)
    if callable(prepare) and "torch_dtype" in inspect.signature(prepare).parameters:
        prepare(tokenizer=tokenizer, torch_dtype=dtype)
    if isinstance(getattr(model, "torch_dtype", None), torch.dtype):
        model.torch_dtype = dtype


def accepts_processor(model: Any) -> bool:
    """Whether ``model.predict_forward`` takes ``processor=`` (v2 does; v1 has no such argument
    and no ``**kwargs``)."""
    parameters = inspect.signature(model.predict_forward).parameters.values()
    return any(p.name == "processor" or p.kind is p.VAR_KEYWORD for p in parameters)


def needs_processor(model: Any) -> bool:
    """Qwen-VL-based Sa2VA asserts a processor; the InternVL-based one ignores it."""
    return "qwen" in type(model).__name__.lower()


def load_processor(source: ModelSource, given: Any | None) -> Any:
    """``given`` or ``AutoProcessor.from_pretrained``, checked to be a real processor."""
    where = source.describe()
    if given is None:
        from transformers import AutoProcessor

        location = remote_code.code_location(source)
        try:
            with remote_code.code_lock(location):
                given = AutoProcessor.from_pretrained(location, **source.load_kwargs())
        except ImportError as exc:
            missing = gen.missing_from_error(exc) or [exc.name or str(exc)]
            raise gen.missing_packages(source.location, missing) from exc
        except (OSError, ValueError) as exc:
            raise UserError(
                f"Sa2VA {where} is Qwen-VL-based and needs its processor, but "
                f"AutoProcessor.from_pretrained failed: {exc}"
            ) from exc
        origin = "AutoProcessor.from_pretrained returned"
    else:
        origin = "processor= is"
    lacking = [a for a in ("tokenizer", "image_processor") if getattr(given, a, None) is None]
    if lacking:
        raise UserError(
            f"Sa2VA {where} is Qwen-VL-based and needs a processor with a tokenizer and an image "
            f"processor; {origin} a {type(given).__name__} without {' and '.join(lacking)} "
            "(the folder lacks the Qwen-VL preprocessor_config.json / processor files? "
            "Re-download the checkpoint, or pass processor=AutoProcessor.from_pretrained(...) of "
            "its base Qwen-VL model)"
        )
    return given


def _dtype_kwarg() -> str:
    # transformers 4.56 renamed `torch_dtype` to `dtype` (the old name warns in 5.x).
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
