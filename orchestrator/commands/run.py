"""``sa2va-rl run``: the main job, all three experiments as concurrent Tune trials.

Stages (each prints a numbered line with its wall time):
  1. config: validate the YAML (and flags) before anything starts; write it to the run dir
  2. data: the built-in synthetic angiograms (or --data), validated; the group-aware split
     saved as split_manifest.json, so every later step uses the same images
  3. GPU plan, Ray, segmentation workers: one worker per GPU that fits (or CPU workers for the
     Frangi backend), refusing an infeasible plan before loading anything
  4. cache warm-up: every (image, prompt) pair once, shared by all trials and later runs
  5. Tune: PPO over prompts, PPO over post-processing, reward-net training then reward-guided
     PPO and the segmenter's mask head fine-tuned against the reward net (with labels beside
     it), as concurrent trials sharing the workers (Tune's status table shows progress)
  6. evaluation of every method on the same test images
  7. summary.json, report.md, plots; the comparison table is printed at the end

Examples:
  sa2va-rl run                                          # quick mode, built-in data, Frangi
  sa2va-rl run --config tune_configs/smoke.yaml --output runs/smoke
  sa2va-rl run --config tune_configs/full.yaml --data data/angio --backend sa2va \\
      --model-path ./Sa2VA-4B --output runs/full
  sa2va-rl run --output runs/full --resume               # continue an interrupted run
  sa2va-rl run --experiment finetune --output runs/ft    # the reward net, then the mask head
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token   # the cluster's token
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      sa2va-rl run --address auto --config tune_configs/quick.yaml --output /shared/runs/q

Ray token authentication stays on: the job API and `ray` clients need RAY_AUTH_MODE=token and
the cluster's token (file named by RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token), or they get
"Authentication required". On a cluster, --output, --data, --cache-dir and --model-path must be
paths every node sees (shared storage). Cluster guide, docker-compose and security notes:
docs/cluster.md.

Watch it: the Ray dashboard (http://127.0.0.1:8265: Jobs, Actors "<run id>:segmentation-worker-*",
Cluster for GPU memory), TensorBoard (`tensorboard --logdir RUN_DIR/tune`).
Exit codes: 0 all trials finished, 1 a trial failed (see report.md), 2 bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.commands.words import CONFIG_WORDS
from orchestrator.config import EXPERIMENTS

if TYPE_CHECKING:
    from orchestrator.pipeline import RunOptions

OPTION_WORDS = CONFIG_WORDS
"""How errors name settings for this command (see :mod:`orchestrator.commands.words`)."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the three experiments on shared workers, evaluate, report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--experiment",
        action="append",
        choices=EXPERIMENTS,
        dest="experiments",
        metavar="NAME",
        help=f"run only this experiment (repeat for more; {', '.join(EXPERIMENTS)}); default: "
        "the config's `experiments`",
    )
    add_run_arguments(parser)
    parser.set_defaults(func=run)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``run`` (``train`` shares them)."""
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="tune_configs/smoke.yaml (minutes, for CI), quick.yaml (the original quick mode's "
        "2,000 env steps per experiment, on all 112 training images: about 5 minutes on 2 "
        "cores; the default) or full.yaml (100 images, 10,000 steps); with --resume the saved "
        "config is used",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="dataset folder (annotations.json, COCO JSON, or images/+masks/); default: the "
        "built-in synthetic angiograms, generated into the run directory",
    )
    parser.add_argument(
        "--backend", choices=("frangi", "sa2va"), help="segmentation backend (default: frangi)"
    )
    parser.add_argument(
        "--model-path",
        metavar="P",
        help="Sa2VA weights: a local folder (or a hub id with backend.revision pinned); "
        "Frangi: a fine-tuned head folder (RUN/finetune/<trial>/model)",
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="run directory: summary.json, report.md, plots, split manifest, resolved config, "
        "Tune experiment (default: runs/<the config's mode>: runs/quick, runs/smoke, runs/full)",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="join a running Ray cluster ('auto' inside `ray job submit`); default: start a "
        "local Ray bound to 127.0.0.1",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output with its saved config: finished trials and cached "
        "inference are reused; a flag or --config that changes a setting of the run is "
        "refused (--num-cpus, --address and --no-dashboard may differ, so a resume may have "
        "more or fewer workers)",
    )
    parser.add_argument(
        "--inventory",
        metavar="SPEC",
        help="declare GPUs instead of reading NVML, e.g. 24:7.5,24:9.5 (GB TOTAL:USED)",
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="inference cache shared across runs (default: workers.cache_dir of the config, "
        "~/.cache/sa2va-rl/inference)",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        metavar="N",
        help="logical CPUs of the local Ray (default: all cores)",
    )
    parser.add_argument(
        "--no-dashboard",
        action="store_true",
        help="do not start the Ray dashboard with the local Ray",
    )


def run(args: argparse.Namespace) -> int:
    from orchestrator.disk import disk_full_error, disk_full_path
    from orchestrator.pipeline import default_output
    from orchestrator.pipeline import run as run_pipeline

    chosen = tuple(dict.fromkeys(args.experiments)) if args.experiments else None
    options = run_options(args, experiments=chosen)
    try:
        return run_pipeline(options)
    except Exception as err:
        # A full disk anywhere (a writer here, a trial, a worker, Tune itself): one message.
        path = disk_full_path(err)
        if path is None:
            raise
        root = Path(options.output or default_output(options)).expanduser().resolve()
        raise disk_full_error(path, root) from None


def run_options(args: argparse.Namespace, **more: Any) -> RunOptions:
    """The :class:`~orchestrator.pipeline.RunOptions` of parsed ``run`` flags."""
    from orchestrator.pipeline import RunOptions

    return RunOptions(
        config=args.config,
        data=args.data,
        backend=args.backend,
        model_path=args.model_path,
        output=args.output,
        address=args.address,
        resume=args.resume,
        dashboard=not args.no_dashboard,
        num_cpus=args.num_cpus,
        cache_dir=args.cache_dir,
        inventory=args.inventory,
        **more,
    )
