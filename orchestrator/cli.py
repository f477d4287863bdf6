"""``sa2va-rl``: the command line.

Each subcommand lives in ``orchestrator/commands/<name>.py`` and exposes ``register(subparsers)``
(adding its parser with ``set_defaults(func=run)``) and ``run(args) -> int``. Heavy imports (Ray,
torch) happen inside ``run`` so that ``--help`` answers instantly.

A :class:`models.errors.UserError` is printed as one message, naming settings in the words of
the command's ``OPTION_WORDS`` (see :mod:`orchestrator.commands.words`), and exits with code 2;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from models.errors import UserError

COMMAND_MODULES = (
    "orchestrator.commands.run",
    "orchestrator.commands.train",
    "orchestrator.commands.demo_data",
    "orchestrator.commands.check_data",
    "orchestrator.commands.plan",
    "orchestrator.commands.cache",
    "orchestrator.commands.report",
    "orchestrator.commands.train_reward_net",
)

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sa2va-rl",
        description=(
            "Run three RL experiments around Sa2VA vessel segmentation (prompt choice, "
            "mask post-processing, reward-network-guided prompts) on shared segmentation "
            "workers, and report which one improves Dice and Recall."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        words = getattr(sys.modules[args.func.__module__], "OPTION_WORDS", {})
        print(f"sa2va-rl {args.command}: error: {err.in_words(words)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"sa2va-rl {args.command}: interrupted", file=sys.stderr)
        return 130
