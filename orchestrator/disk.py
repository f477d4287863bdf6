"""Disk space: the plan of what a run will write, checked before anything starts, and a full
disk met mid-run turned into one message that says what to do.

**The plan** (:func:`plan_disk`, printed by ``sa2va-rl plan`` and checked by ``sa2va-rl run``
after the data stage, before Ray or any worker starts): the bytes each output will take
(:func:`run_needs`) against the free space of the filesystem it goes to; outputs sharing a
filesystem add up. :meth:`DiskPlan.require` refuses a plan that does not fit with a
:class:`DiskFullError` naming the path, the need and the free space.

**A full disk mid-run** (``ENOSPC`` / ``EDQUOT``): every writer lets the ``OSError`` rise with
the path it wrote; :func:`disk_full_path` finds it in any exception (also one wrapped by Ray
or Tune, or only its text after it crossed a process), and :func:`disk_full_error` makes the
message: the path, the space left there, and "free space, then ``--resume``".

**Fault injection** for tests: with ``SA2VA_RL_INJECT_ENOSPC=<text>`` in the environment (Ray's
workers and trials inherit it from the driver), :func:`inject_fault` raises ``ENOSPC`` for every
path containing ``<text>``; the project's writers call it before writing.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from models.errors import UserError

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.run_dir import RunPaths

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
INJECT_ENV = "SA2VA_RL_INJECT_ENOSPC"
"""Environment variable of :func:`inject_fault` (tests only)."""
_ERRNO_TEXT = re.compile(rf"\[Errno (?:{errno.ENOSPC}|{errno.EDQUOT})\][^'\n]*'([^'\n]+)'")
_PLAIN_TEXT = ("No space left on device", "Disk quota exceeded")


class DiskFullError(UserError):
    """A disk too small for the run's plan, or one that filled up while it ran."""


def inject_fault(path: str | os.PathLike[str]) -> None:
    """Raise ``OSError(ENOSPC)`` for ``path`` when :data:`INJECT_ENV` names part of it."""
    pattern = os.environ.get(INJECT_ENV)
    if pattern and pattern in str(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes (for this user) on the filesystem ``path`` is or would be created on."""
    return shutil.disk_usage(_existing(Path(path))).free


def disk_full_path(err: BaseException) -> str | None:
    """The path a disk-full ``OSError`` inside ``err`` was writing (``""`` when it names none),
    or ``None`` when ``err`` is not about a full disk. Looks through ``__cause__``,
    ``__context__`` and Ray's ``cause``, and at the text of errors that crossed processes."""
    stack: list[BaseException | None] = [err]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return "" if current.filename is None else str(current.filename)
        text = str(current)
        match = _ERRNO_TEXT.search(text)
        if match:
            return match.group(1)
        if any(words in text for words in _PLAIN_TEXT):
            return ""
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None


def disk_full_error(path: str | os.PathLike[str], run_root: Path) -> DiskFullError:
    """The message for a disk that filled up while writing ``path`` during the run in
    ``run_root``: where, how much is free there now, and what to do."""
    where = Path(path) if str(path) else run_root
    return DiskFullError(
        f"the disk is full: could not write {where} ({format_bytes(free_bytes(where))} free "
        "there now). Free space on that disk (`sa2va-rl cache` shows and prunes the inference "
        f"cache), then continue with `sa2va-rl run --output {run_root} --resume`: finished "
        "trials are kept and unfinished ones continue from their last checkpoint."
    )


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest decimal unit below it (``1.5 GB``)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# --- the plan --------------------------------------------------------------------------------

CACHE_ENTRY_BYTES_PER_PX = 0.75
"""Disk per cache entry per image pixel: the measured mean of Frangi's 512x512 entries is 0.61
(161 KB; benchmarks/bench_cache.py), Sa2VA's near-binary maps compress further."""
CACHE_ENTRY_OVERHEAD = 1024
"""Header, checksum and file-system slack per entry."""
CHECKPOINTS_ON_DISK = 3
"""Tune keeps 2 checkpoints per trial (``num_to_keep``) and writes the next before dropping one."""
CHECKPOINT_BYTES = 2 * 10**6
"""One PPO checkpoint (RLlib state + ``best_policy.pt``): 0.59 MB measured with the default
(128, 64) networks."""
TRIAL_LOG_BYTES_PER_ITERATION = 20_000
"""``result.json``, ``progress.csv`` and TensorBoard events per PPO iteration (upper bound)."""
REWARD_NET_BYTES = 5 * 10**6
"""``best_reward_net.pt``, its report and validation predictions (0.38 MB in the quick run)."""
FRANGI_HEAD_EXPORT_BYTES = 10**6
"""An exported Frangi head folder (its weights are ~30 KB)."""
SA2VA_EXPORT_SLACK_BYTES = 50 * 10**6
"""Beyond the weights, what a Sa2VA model folder holds (tokenizer, code, config, provenance)."""
REPORT_BYTES = 10 * 10**6
"""``eval/`` (per-image CSVs, example overlays), ``plots/``, ``report.md``, ``summary.json``
(1.9 MB in the quick run)."""


@dataclass(frozen=True)
class DiskNeed:
    """One output of the run: what, where, and how many bytes it will take at most."""

    what: str
    path: Path
    bytes: int


@dataclass(frozen=True)
class DiskVolume:
    """The needs that share one filesystem, and its free space."""

    path: Path
    """The first need's path (what the messages name)."""
    free: int
    needs: tuple[DiskNeed, ...]

    @property
    def need(self) -> int:
        return sum(n.bytes for n in self.needs)

    @property
    def fits(self) -> bool:
        return self.need <= self.free


@dataclass(frozen=True)
class DiskPlan:
    volumes: tuple[DiskVolume, ...]

    def require(self) -> None:
        """Raise :class:`DiskFullError` naming every filesystem the run would fill."""
        short = [v for v in self.volumes if not v.fits]
        if short:
            said = "; ".join(
                f"{v.path} needs {format_bytes(v.need)} "
                f"({', '.join(n.what for n in v.needs)}) but has {format_bytes(v.free)} free"
                for v in short
            )
            raise DiskFullError(
                f"not enough disk space for this run: {said}. Free space there, or choose "
                "another --output / --cache-dir (`sa2va-rl cache` shows and prunes the cache); "
                "`sa2va-rl plan --disk` shows the plan."
            )

    def format(self) -> str:
        """The plan as lines: each output with its bytes, grouped by filesystem."""
        lines = ["disk plan (upper bounds):"]
        for volume in self.volumes:
            verdict = "fits" if volume.fits else "DOES NOT FIT"
            lines.append(
                f"  {volume.path}: {format_bytes(volume.need)} of {format_bytes(volume.free)} "
                f"free: {verdict}"
            )
            lines += [f"    {format_bytes(n.bytes):>9}  {n.what} ({n.path})" for n in volume.needs]
        return "\n".join(lines)


def plan_disk(needs: Iterable[DiskNeed], free: Callable[[Path], int] | None = None) -> DiskPlan:
    """Group ``needs`` by filesystem (device of the nearest existing folder) with its free
    space (``free``, default :func:`free_bytes`)."""
    free = free or free_bytes
    groups: dict[int, list[DiskNeed]] = {}
    for need in needs:
        groups.setdefault(os.stat(_existing(need.path)).st_dev, []).append(need)
    volumes = (DiskVolume(g[0].path, free(g[0].path), tuple(g)) for g in groups.values())
    return DiskPlan(tuple(volumes))


def run_needs(
    run_root: Path,
    cache_dir: Path,
    pairs: int,
    image_hw: tuple[int, int],
    trials: int,
    iterations: int,
    reward_net: bool,
    exports: tuple[int, int] = (0, 0),
) -> list[DiskNeed]:
    """What a run writes: cache entries for ``pairs`` (image, prompt) pairs of ``image_hw``
    images (pairs already cached cost nothing, so this is an upper bound), ``trials`` PPO
    trials of ``iterations`` iterations, the reward net, the report, and ``exports``: (how
    many fine-tuned models, bytes of each), written under ``finetune/``."""
    needs = [
        DiskNeed(f"cache entries, {pairs} pairs", cache_dir, pairs * cache_entry_bytes(*image_hw)),
        DiskNeed(
            f"trial checkpoints and logs, {trials} trials",
            run_root / "tune",
            trials * (CHECKPOINTS_ON_DISK * CHECKPOINT_BYTES)
            + trials * iterations * TRIAL_LOG_BYTES_PER_ITERATION,
        ),
        DiskNeed("evaluation and report", run_root, REPORT_BYTES),
    ]
    if reward_net:
        needs.append(DiskNeed("reward net", run_root / "reward_net", REWARD_NET_BYTES))
    count, each = exports
    if count:
        needs.append(
            DiskNeed(f"fine-tuned models, {count} exports", run_root / "finetune", count * each)
        )
    return needs


def run_needs_of(
    config: RunConfig, paths: RunPaths, pairs: int, image_hw: tuple[int, int]
) -> list[DiskNeed]:
    """:func:`run_needs` of a run of ``config`` into ``paths`` that segments ``pairs`` new
    (image, prompt) pairs of about ``image_hw`` pixels each (every trial instance: one per
    training seed for a seeded trial)."""
    from orchestrator.experiments import instances, trials_for

    trials = trials_for(config)
    count = {t.name: len(instances(t, config)) for t in trials}
    return run_needs(
        paths.root,
        Path(config.workers.cache_dir).expanduser(),
        pairs,
        image_hw,
        sum(count.values()),
        -(-config.ppo.total_env_steps // config.ppo.train_batch_size),
        any(t.trains_reward_net for t in trials),
        (sum(count[t.name] for t in trials if t.head_objective), export_bytes(config)),
    )


def export_bytes(config: RunConfig) -> int:
    """Disk one fine-tuned model of ``config``'s backend takes: for Sa2VA a copy of the whole
    checkpoint (its weight files, read from the folder, or the declared size's bf16 weights
    where the folder cannot be read here), for Frangi a small head folder."""
    if config.backend.name != "sa2va":
        return FRANGI_HEAD_EXPORT_BYTES
    from models.sa2va.checkpoint_size import read_model_weights
    from orchestrator.gpu import footprints

    weights = None
    if config.backend.model_path:
        try:
            weights = read_model_weights(config.backend.model_path, config.backend.revision)
        except UserError:
            weights = None
    if weights is not None:
        return weights.disk_bytes + SA2VA_EXPORT_SLACK_BYTES
    size = (config.backend.model_size or "4B").lower()
    return footprints.FOOTPRINTS[f"sa2va-{size}"].weights_mb * 2**20 + SA2VA_EXPORT_SLACK_BYTES


def plan_before_run(config: RunConfig, paths: RunPaths) -> DiskPlan:
    """The disk plan of a run not started yet (``sa2va-rl plan --disk``): every image of the
    dataset with every prompt (an upper bound: pairs already cached cost nothing), images of
    the built-in data's size, or of the first image found under ``data.path``."""
    import cv2

    from envs.synthetic import IMAGE_SIZE

    if config.data.path is None:
        count, hw = config.data.synthetic_n, (IMAGE_SIZE, IMAGE_SIZE)
    else:
        suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
        root = Path(config.data.path).expanduser()
        files = sorted(
            p for p in root.rglob("*") if p.suffix.lower() in suffixes and "mask" not in str(p)
        )
        first = cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED) if files else None
        count, hw = len(files), (0, 0) if first is None else first.shape[:2]
    pairs = count * len(config.env.prompts)
    return plan_disk(run_needs_of(config, paths, pairs, (int(hw[0]), int(hw[1]))))


def cache_entry_bytes(height: int, width: int) -> int:
    """Upper estimate of one cache entry's disk use for an image of ``height`` x ``width``."""
    return int(height * width * CACHE_ENTRY_BYTES_PER_PX) + CACHE_ENTRY_OVERHEAD
