"""What one process holds on a GPU: the footprint table and the footprint of a checkpoint.

A :class:`Footprint` is a model's weights plus the activations of one call (for Sa2VA: per
input cap, through the number of InternVL tiles the cap gives), in whole MB (MiB). The table
(:data:`FOOTPRINTS`) holds the released Sa2VA sizes from their parameter counts, the CPU-only
Frangi backend, and what GPU-using trials hold (reward-net training, Sa2VA head fine-tuning); a
run sizes a Sa2VA worker from the checkpoint folder itself (:func:`checkpoint_footprint`) and uses
the table only where the folder cannot be read. :mod:`orchestrator.gpu.budget` places the
footprints on the GPUs. Pure Python: importing this module does not import Ray or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from models.errors import UserError, option
from orchestrator.gpu.inventory import gb_to_mb

if TYPE_CHECKING:
    from collections.abc import Mapping

    from models.sa2va.checkpoint_size import CheckpointWeights

INPUT_CAPS = (1024, 512, 256)
"""Worker input caps tried in order (longest image side, px): the worker's OOM back-off halves
the cap down to 256, so the plan uses the same steps."""
SA2VA_TILE_PX = 448
SA2VA_MAX_TILES = 12
"""Sa2VA's InternVL preprocessing: 448 px tiles, at most ``max_dynamic_patch`` = 12."""
SAM2_PARAMS_M = 224
"""SAM2 Hiera-L (224.4 M parameters), the mask decoder inside every Sa2VA."""
BF16_BYTES = 2


@dataclass(frozen=True)
class Footprint:
    """GPU memory one user of a GPU needs.

    Attributes:
        name: table key (``sa2va-4b``) or ``custom (N GB)`` for ``--model-gb``.
        kind: ``segmenter`` (a worker backend, may get a GPU) or ``trial`` (a Tune trial that
            requests ``gpu_mem_mb``).
        weights_mb: memory that does not depend on the input (bf16 weights).
        activation_mb: working memory of one request at one 448 px tile, CUDA context included.
        per_tile_mb: extra working memory per additional tile.
        params_m: parameter count in millions, where the footprint comes from one.
        needs_gpu: False for CPU backends (Frangi).
    """

    name: str
    kind: str
    weights_mb: int
    activation_mb: int = 0
    per_tile_mb: int = 0
    params_m: int | None = None
    needs_gpu: bool = True

    def worker_mb(self, input_cap: int) -> int:
        """MB one worker holds when its longest input side is at most ``input_cap``."""
        extra_tiles = sa2va_tiles(input_cap) - 1 if self.per_tile_mb else 0
        return self.weights_mb + self.activation_mb + extra_tiles * self.per_tile_mb


def sa2va_tiles(input_cap: int) -> int:
    """Tiles Sa2VA cuts a square image of side ``input_cap`` into (the worst case for that
    longest side), thumbnail included: InternVL's ``dynamic_preprocess`` takes the largest
    n x n grid (n*n <= 12) whose tile area is under twice the image area."""
    n = 1
    while (n + 1) ** 2 <= SA2VA_MAX_TILES and input_cap**2 > 0.5 * (SA2VA_TILE_PX * (n + 1)) ** 2:
        n += 1
    return n * n + (1 if n > 1 else 0)


def _sa2va(size: str, vlm_params_m: int, activation_mb: int, per_tile_mb: int) -> Footprint:
    params_m = vlm_params_m + SAM2_PARAMS_M
    weights_mb = math.ceil(params_m * 1_000_000 * BF16_BYTES / 2**20)
    return Footprint(f"sa2va-{size}", "segmenter", weights_mb, activation_mb, per_tile_mb, params_m)


# Parameter counts: the InternVL2.5 base models (1B: 938 M, 4B: 3.71 B, 8B: 8.08 B, 26B: 25.5 B,
# from their model cards) plus SAM2; a run takes the weights from the checkpoint folder instead
# (checkpoint_footprint) and these only where the files cannot be read. Activation allowances
# are estimates: CUDA context (~0.5 GB), SAM2 at 1024 px and a short generation at one tile; per
# extra tile the KV cache of 256 visual tokens and the vision encoder's transient memory. Every
# GPU worker measures its own figures and reports them beside these (summary.json's
# gpu_memory, orchestrator/inference/gpu_memory.py; benchmarks/bench_sa2va.py on one GPU).
FOOTPRINTS: Mapping[str, Footprint] = {
    "frangi": Footprint("frangi", "segmenter", 0, needs_gpu=False),
    "sa2va-1b": _sa2va("1b", 938, activation_mb=1024, per_tile_mb=32),
    "sa2va-4b": _sa2va("4b", 3713, activation_mb=1536, per_tile_mb=64),
    "sa2va-8b": _sa2va("8b", 8075, activation_mb=2048, per_tile_mb=128),
    "sa2va-26b": _sa2va("26b", 25514, activation_mb=3072, per_tile_mb=256),
    # A small CNN on RGB+mask at 256 px (~50 MB with Adam state), batch 8, plus its own CUDA
    # context: the original ran it next to Sa2VA and had to cut the batch after an OOM.
    "reward-net-train": Footprint("reward-net-train", "trial", 512, activation_mb=512),
    # Sa2VA's head in float32 with Adam (text_hidden_fcs, ~14 M parameters for an 8B LLM's
    # hidden size, + SAM2's mask decoder, ~4 M: x4 for weights, gradients and two moments) and
    # its CUDA context; the activations of 8 images' decoder calls kept for the backward pass
    # (SAM2's two-way transformer on 64x64 tokens, the masks upsampled to 1024 px and the image).
    "sa2va-head-train": Footprint("sa2va-head-train", "trial", 768, activation_mb=1280),
}
SEGMENTER_MODELS = tuple(k for k, f in FOOTPRINTS.items() if f.kind == "segmenter")
REWARD_NET_TRAIN_MB = (
    FOOTPRINTS["reward-net-train"].weights_mb + FOOTPRINTS["reward-net-train"].activation_mb
)
SA2VA_HEAD_TRAIN_MB = (
    FOOTPRINTS["sa2va-head-train"].weights_mb + FOOTPRINTS["sa2va-head-train"].activation_mb
)


def custom_footprint(model_gb: float) -> Footprint:
    """``--model-gb``: ``model_gb`` is all one worker holds (weights and activations, e.g. as
    measured with nvidia-smi); the margin comes on top. No per-tile figure, so the input cap
    stays at its largest step."""
    if not model_gb > 0:
        raise UserError(f"{option('model_gb')} must be a positive number of GB, got {model_gb!r}")
    return Footprint(f"custom ({model_gb:g} GB)", "segmenter", gb_to_mb(model_gb))


def footprint_for(
    backend: str,
    model_size: str | None = None,
    model_gb: float | None = None,
    checkpoint: CheckpointWeights | None = None,
    dtype: str = "bfloat16",
) -> Footprint:
    """The worker footprint for a run config: ``backend`` ``frangi`` or ``sa2va``.

    For Sa2VA the weights come from the ``checkpoint`` folder when it could be read, loaded in
    ``dtype`` (:func:`checkpoint_footprint`); the table's ``model_size`` (``1B``/``4B``/``8B``/
    ``26B``, default 4B) only when it could not. ``model_gb`` replaces the figures (all a worker
    holds), but never below the checkpoint's own weights."""
    if checkpoint is not None and backend != "frangi":
        return checkpoint_footprint(checkpoint, dtype, model_size, model_gb)
    if model_gb is not None:
        return custom_footprint(model_gb)
    key = "frangi" if backend == "frangi" else f"{backend}-{(model_size or '4B').lower()}"
    if key not in FOOTPRINTS or FOOTPRINTS[key].kind != "segmenter":
        raise UserError(
            f"no GPU footprint for backend {backend!r} size {model_size!r}; "
            f"known: {', '.join(SEGMENTER_MODELS)}"
        )
    return FOOTPRINTS[key]


def nearest_size(params_m: float) -> str:
    """The Sa2VA size (``1B``/``4B``/``8B``/``26B``) whose parameter count is nearest to
    ``params_m`` million (by ratio)."""
    sized = {n: f.params_m for n, f in FOOTPRINTS.items() if n.startswith("sa2va-") and f.params_m}
    name = min(sized, key=lambda n: abs(math.log(max(params_m, 1e-3) / sized[n])))
    return name.removeprefix("sa2va-").upper()


def checkpoint_footprint(
    checkpoint: CheckpointWeights,
    dtype: str,
    model_size: str | None = None,
    model_gb: float | None = None,
) -> Footprint:
    """A worker of the checkpoint read from its folder: its parameters in ``dtype`` as the
    weights, and the activation figures of the Sa2VA size nearest to its parameter count.

    Raises:
        UserError: ``model_size`` declared but the folder is nearest another size (planned at
            the declared size the workers could run out of memory, or waste GPUs), or
            ``model_gb`` below the checkpoint's weights.
    """
    size = nearest_size(checkpoint.parameters / 1e6)
    weights_mb = math.ceil(checkpoint.loaded_bytes(dtype) / 2**20)
    where = f"the model folder {checkpoint.folder} holds {checkpoint.describe()}"
    if model_size is not None and model_size.upper() != size:
        raise UserError(
            f"{option('model')} says {model_size}, but {where}: the size of Sa2VA-{size}, "
            f"{weights_mb} MB of weights in {dtype}. The GPU plan reads the folder: drop the "
            f"declared size, or set it to {size}."
        )
    if model_gb is not None and gb_to_mb(model_gb) < weights_mb:
        raise UserError(
            f"{option('model_gb')} is {model_gb:g} GB, but {where}, {weights_mb} MB of weights in "
            f"{dtype} alone. Measure a worker again (weights and activations) or drop it."
        )
    if model_gb is not None:
        return custom_footprint(model_gb)
    table = FOOTPRINTS[f"sa2va-{size.lower()}"]
    count = checkpoint.parameters
    size_text = f"{count / 1e9:.2f}B" if count >= 10**8 else f"{count:,} parameters"
    name = f"sa2va {size_text} ({Path(checkpoint.folder).name}, {dtype})"
    params_m = round(checkpoint.parameters / 1e6)
    return Footprint(
        name, "segmenter", weights_mb, table.activation_mb, table.per_tile_mb, params_m
    )
