"""``sa2va-rl train``: one experiment, on Ray/Tune like ``run`` or, with ``--local``, in one
process (the debug path).

  sa2va-rl train --experiment prompt --local --config tune_configs/smoke.yaml --output runs/dbg

``--local`` runs the experiment's trials one after the other in this process: no Ray, no Tune,
an in-process segmentation worker (same backend, same disk cache, same config). Each trial
writes ``OUTPUT/local/<trial>/``: TensorBoard events (``rollout/ep_rew_mean``,
``custom/gt_dice``, ``eval/dice``, ...), ``best_policy.pt`` (PPO) and ``result.json``. A
breakpoint or a profiler works as in any script. Expected on smoke.yaml: each PPO trial ends
with ``eval/dice`` in its last result (around 0.5 on the built-in data; nothing learns in 64
steps), in about a minute per trial on 2 cores.

Without ``--local`` the experiment runs through the whole ``run`` pipeline (Ray workers, Tune,
evaluation, report) with ``experiments: [NAME]``. Experiments: prompt (1), postprocess (2),
reward (3: the reward net, then the reward-guided PPO), finetune (the reward net, then the mask
head fine-tuned against it without labels, and the same head trained with labels).
Exit codes: 0 done, 1 a trial failed, 2 bad input.
"""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.commands.run import add_run_arguments, run_options
from orchestrator.commands.words import CONFIG_WORDS
from orchestrator.config import EXPERIMENTS

OPTION_WORDS = CONFIG_WORDS
"""How errors name settings for this command (see :mod:`orchestrator.commands.words`)."""
RAY_ONLY = ("address", "num_cpus", "inventory", "resume", "no_dashboard")
"""Flags that configure Ray or Tune: refused with --local, which uses neither."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="run one experiment (--local: in one process, without Ray or Tune)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--experiment", required=True, choices=EXPERIMENTS)
    parser.add_argument(
        "--local",
        action="store_true",
        help="one process: no Ray, no Tune, an in-process segmentation worker",
    )
    add_run_arguments(parser)
    parser.set_defaults(func=run, output=None)


def run(args: argparse.Namespace) -> int:
    from models.errors import UserError
    from orchestrator.pipeline import run as run_pipeline

    output = args.output or f"runs/{args.experiment}{'-local' if args.local else ''}"
    options = run_options(args, experiments=(args.experiment,))
    options.output = output
    if not args.local:
        return run_pipeline(options)
    given = [f"--{f.replace('_', '-')}" for f in RAY_ONLY if getattr(args, f) not in (None, False)]
    if given:
        raise UserError(f"{', '.join(given)} configure Ray or Tune; --local uses neither")
    from orchestrator.training.local import train_locally

    train_locally(options, args.experiment)
    print(f"trials: {options.output}/local/ (TensorBoard: tensorboard --logdir {output}/local)")
    return 0
