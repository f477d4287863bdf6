"""``sa2va-rl train-reward-net``: train the reward network on its own, without Ray.

What it does, in one process:
  1. config: tune_configs/quick.yaml (or --config), flags override its reward_net/data/backend
  2. data: --data DIR (any supported format), or the dataset of --manifest, or the built-in
     synthetic angiograms (160 frames, seed 0, as `sa2va-rl demo-data`) generated into
     OUTPUT/data; split by video like `sa2va-rl run` (OUTPUT/split_manifest.json), or the
     split --manifest records (use a run's manifest to train for that run)
  3. examples: every TRAIN and VAL image segmented with every prompt by the local backend
     (Frangi unless the config says otherwise), plus random post-processing sequences, each
     mask scored against the ground truth (progress bar per split)
  4. training: one line per epoch with the validation MAE; the best epoch is kept
  5. report: validation MAE, Pearson and Spearman per target next to the mean predictor (always
     predicting the training mean), and the mean within-image Spearman (how well it ranks the
     masks of one image, which is what the reward-guided PPO uses)

Writes OUTPUT/best_reward_net.pt (loads with torch.load(weights_only=True); metadata: input
size, backend_id, manifest_hash) and OUTPUT/report.json, each atomically. Existing ones in
OUTPUT are replaced; generated data and the split in OUTPUT are reused.

Examples:
  sa2va-rl train-reward-net --output runs/reward_net       # built-in data, ~1.5 min on 2 cores
  sa2va-rl train-reward-net --data data/angio --output runs/rn-angio --epochs 20
  sa2va-rl train-reward-net --manifest runs/quick/split_manifest.json \\
      --config runs/quick/config.yaml --output runs/rn-quick   # exactly what that run needs

Expected result on the built-in data (the first example, Frangi backend, quick settings):
2688 train / 576 val examples; on Dice a validation MAE of 0.055 against the mean predictor's
0.121, Spearman 0.91 (mean predictor: 0) and within-image Spearman 0.86, the best epoch kept.
Exit codes: 0 done, 2 bad input (the message says what to change).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, NamedTuple

from orchestrator.commands.words import CONFIG_WORDS

DEFAULT_OUTPUT = "runs/reward_net"
CHECKPOINT_FILE = "best_reward_net.pt"
REPORT_FILE = "report.json"

OPTION_WORDS = CONFIG_WORDS
"""How errors name settings for this command (see :mod:`orchestrator.commands.words`)."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train-reward-net",
        help="train the reward network alone (no Ray) and report it against the mean predictor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="labelled dataset folder (annotations.json, COCO JSON, or images/+masks/); "
        "default: the dataset of --manifest, else the built-in synthetic angiograms",
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        default=DEFAULT_OUTPUT,
        help=f"where {CHECKPOINT_FILE}, {REPORT_FILE}, the split and generated data go "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="run config whose reward_net, data, backend, env.prompts and mask_ops sections "
        "apply (default: tune_configs/quick.yaml)",
    )
    parser.add_argument(
        "--manifest",
        metavar="FILE",
        help="split manifest to train on (e.g. RUN/split_manifest.json of a run, or one from "
        "`sa2va-rl check-data --split-out`); its manifest_hash goes into the checkpoint",
    )
    parser.add_argument(
        "--backend", choices=("frangi", "sa2va"), help="segmentation backend (default: frangi)"
    )
    parser.add_argument("--model-path", metavar="P", help="Sa2VA weights (with --backend sa2va)")
    parser.add_argument("--epochs", type=int, metavar="N", help="training epochs")
    parser.add_argument(
        "--samples-per-image",
        type=int,
        metavar="N",
        help="masks per image: every prompt's, then random post-processing sequences",
    )
    parser.add_argument("--input-size", type=int, metavar="PX", help="network input side")
    parser.add_argument("--batch-size", type=int, metavar="N", help="training batch size")
    parser.add_argument("--lr", type=float, metavar="X", help="peak learning rate (one-cycle)")
    parser.add_argument(
        "--max-images", type=int, metavar="N", help="use at most N train and N val images"
    )
    parser.add_argument("--seed", type=int, metavar="N", help="seed of mask sampling and training")
    parser.set_defaults(func=run)


_FLAG_KEYS = {
    "epochs": "epochs",
    "samples_per_image": "samples_per_image",
    "input_size": "input_size",
    "batch_size": "batch_size",
    "lr": "lr",
    "max_images": "max_images",
    "seed": "seed",
}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    net = {key: getattr(args, flag) for flag, key in _FLAG_KEYS.items()}
    out: dict[str, Any] = {"reward_net": {k: v for k, v in net.items() if v is not None}}
    if args.data is not None:
        out["data"] = {"path": args.data}
    backend = {"name": args.backend, "model_path": args.model_path}
    out["backend"] = {k: v for k, v in backend.items() if v is not None}
    return out


class _Data(NamedTuple):
    """The dataset, the split to use and the id tying a checkpoint to it."""

    root: str
    dataset: Any
    split: Any
    manifest_hash: str
    manifest_path: Path


def _prepare_data(config: Any, args: argparse.Namespace, output: Path) -> _Data:
    from envs.datasets import load_dataset
    from envs.split import check_manifest_matches, read_manifest
    from orchestrator.data import prepare_data
    from orchestrator.run_dir import RunPaths

    if args.manifest is None:
        prepared = prepare_data(config, RunPaths(output))
        manifest_path = RunPaths(output).manifest
        manifest = read_manifest(manifest_path)
        root = prepared.data_dir
    else:
        manifest_path = Path(args.manifest).expanduser()
        manifest = read_manifest(manifest_path)
        root = config.data.path or manifest.root
        print(f"  split from {manifest_path} (data {root})")
    dataset = load_dataset(
        root,
        fmt=manifest.format,
        group_pattern=manifest.group_pattern,
        skip_bad=config.data.skip_bad,
    )
    check_manifest_matches(manifest, dataset)
    return _Data(str(root), dataset, manifest.split, manifest.manifest_hash, manifest_path)


def _examples(config: Any, data: _Data, segmenter: Any) -> dict[str, list[Any]]:
    """Reward-net examples of the train and val splits, with a progress bar per split."""
    from tqdm import tqdm

    from envs.sources import spread
    from orchestrator.training.reward_net import examples_for

    cfg = config.reward_net
    out = {}
    for name in ("train", "val"):
        ids = spread(getattr(data.split, name), cfg.max_images)
        with tqdm(total=len(ids), desc=f"  {name} images", unit="img") as bar:
            out[name] = examples_for(
                config,
                (data.dataset.load(i) for i in ids),  # one image in memory at a time
                segmenter,
                on_image=lambda _i: bar.update(1),
            )
    return out


def run(args: argparse.Namespace) -> int:
    from models.backends import make_segmenter
    from models.reward_net import save_checkpoint
    from models.segmentation import MemoSegmenter
    from orchestrator.cluster import backend_spec
    from orchestrator.config import CONFIG_DIR, config_to_dict, load_config
    from orchestrator.run_dir import write_json
    from orchestrator.training.reward_net import fit

    started = time.monotonic()
    config = load_config(args.config or CONFIG_DIR / "quick.yaml", _overrides(args))
    cfg = config.reward_net
    output = Path(args.output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    print(f"[1/4] data and split -> {output}", flush=True)
    data = _prepare_data(config, args, output)
    name, options = backend_spec(config)
    segmenter = MemoSegmenter(make_segmenter(name, **options), max_items=len(config.env.prompts))
    print(
        f"[2/4] examples: {cfg.samples_per_image} masks per image from {len(config.env.prompts)} "
        f"prompts and post-processing, backend {segmenter.backend_id}",
        flush=True,
    )
    examples = _examples(config, data, segmenter)
    built = time.monotonic()
    print(
        f"[3/4] training on {len(examples['train'])} examples, validating on "
        f"{len(examples['val'])}: {cfg.epochs} epochs at {cfg.input_size} px",
        flush=True,
    )
    model, report = fit(
        config, examples["train"], examples["val"], on_epoch=_epoch_printer(cfg.epochs)
    )
    trained = time.monotonic()
    metadata = {
        "input_size": cfg.input_size,
        "backend_id": segmenter.backend_id,
        "manifest_hash": data.manifest_hash,
    }
    checkpoint = save_checkpoint(output / CHECKPOINT_FILE, model, metadata)
    seconds = {
        "examples": round(built - started, 1),
        "training": round(trained - built, 1),
        "total": round(trained - started, 1),
    }
    write_json(
        output / REPORT_FILE,
        {
            **report.to_dict(),
            "beats_mean_predictor": {t: report.beats_mean_predictor(t) for t in report.targets},
            "checkpoint": str(checkpoint),
            "metadata": metadata,
            "data": data.root,
            "manifest": str(data.manifest_path),
            "reward_net_config": config_to_dict(config)["reward_net"],
            "seconds": seconds,
        },
    )
    print(f"[4/4] report ({seconds['total']:.0f} s in all, {seconds['training']:.0f} s training)")
    print(report.summary())
    _print_verdict(report)
    print(f"wrote {checkpoint} and {output / REPORT_FILE}")
    return 0


def _epoch_printer(epochs: int) -> Any:
    best = [float("inf")]

    def on_epoch(epoch: int, val_mae: float) -> None:
        mark = "  (best so far)" if val_mae < best[0] else ""
        best[0] = min(best[0], val_mae)
        print(f"  epoch {epoch:3d}/{epochs}  val MAE {val_mae:.4f}{mark}", flush=True)

    return on_epoch


def _print_verdict(report: Any) -> None:
    dice = report.targets["dice"]
    if report.beats_mean_predictor("dice"):
        print(
            f"dice: beats the mean predictor (MAE {dice.mae:.4f} < {dice.mean_predictor_mae:.4f}, "
            f"Spearman {dice.spearman:+.3f} > 0)"
        )
    else:
        print(
            "WARNING: on Dice the reward net does NOT beat the mean predictor; its scores are "
            "noise for the reward-guided experiment. Train on more images, more "
            "--samples-per-image or more --epochs."
        )
