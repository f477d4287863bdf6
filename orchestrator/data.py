"""Stage 2 of a run: the data, checked once, and the reference every later consumer loads from.

:func:`prepare_data` generates the built-in data if needed, validates the dataset with every
data setting of the config (format, group pattern, ``skip_bad``), writes or checks the split
manifest, and returns a :class:`PreparedData` whose :class:`~envs.sources.DataRef` travels in
every :class:`~orchestrator.experiments.TrialSpec`: the warm-up, the trials and the evaluation
all load through :func:`envs.sources.load_split` with those same settings (once per process).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from envs.datasets import DEFAULT_GROUP_PATTERN
from envs.sources import DataRef, load_split, validated_dataset
from envs.split import check_manifest_matches, read_manifest, split_dataset, write_manifest
from orchestrator.config import DataConfig, RunConfig
from orchestrator.run_dir import RunPaths


@dataclass(frozen=True)
class PreparedData:
    """The run's data reference and how many images each split has."""

    ref: DataRef
    split_sizes: dict[str, int]

    @property
    def data_dir(self) -> str:
        return self.ref.data_dir

    @property
    def manifest_hash(self) -> str:
        return self.ref.manifest_hash


def group_pattern(data: DataConfig) -> str | None:
    """The config's ``data.group_pattern`` as a regex (``default``: frames of one video)."""
    return DEFAULT_GROUP_PATTERN if data.group_pattern == "default" else data.group_pattern


def data_dir(config: RunConfig, paths: RunPaths) -> Path:
    """The run's dataset folder: ``data.path``, or the built-in data inside the run."""
    if config.data.path is None:
        return paths.synthetic_data
    return Path(config.data.path).expanduser().resolve()


def data_ref(config: RunConfig, paths: RunPaths, manifest_hash: str) -> DataRef:
    """The reference to the run's data with every data setting of ``config``."""
    return DataRef(
        data_dir=str(data_dir(config, paths)),
        manifest=str(paths.manifest),
        manifest_hash=manifest_hash,
        format=config.data.format,
        group_pattern=group_pattern(config.data),
        skip_bad=config.data.skip_bad,
    )


def prepare_data(config: RunConfig, paths: RunPaths) -> PreparedData:
    """Generate the built-in data if needed, validate the dataset, write or check the split."""
    data = config.data
    root = data_dir(config, paths)
    if data.path is None and not (root / "annotations.json").is_file():
        from envs.synthetic import write_dataset

        write_dataset(
            root,
            n=data.synthetic_n,
            seed=data.synthetic_seed,
            frames_per_video=data.synthetic_frames_per_video,
        )
    pattern = group_pattern(data)
    # Stage 2 is the authority on the data: validate afresh, then every later consumer in this
    # process (warm-up, evaluation, local trials) reuses this validated dataset.
    validated_dataset.cache_clear()
    load_split.cache_clear()
    dataset = validated_dataset(str(root), data.format, pattern, data.skip_bad, True)
    for entry, reason in dataset.skipped:
        print(f"  skipped {entry}: {reason}")
    if paths.manifest.is_file():
        manifest = read_manifest(paths.manifest)
        check_manifest_matches(manifest, dataset)
    else:
        split = split_dataset(dataset, data.split_fractions, data.split_seed)
        manifest = write_manifest(
            paths.manifest, dataset, split, data.split_seed, data.split_fractions, pattern
        )
    sizes = {name: len(getattr(manifest.split, name)) for name in ("train", "val", "test")}
    print(f"  {len(dataset)} images from {root} ({dataset.format}); split {sizes}")
    return PreparedData(data_ref(config, paths, manifest.manifest_hash), sizes)
