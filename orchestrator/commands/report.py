"""``sa2va-rl report RUN_DIR``: rebuild a finished run's report from its saved files.

Rewrites ``summary.json`` (its ``methods``: means, 95% bootstrap CIs, paired differences),
``report.md`` and ``plots/*.png`` from what the run saved: ``eval/per_image.csv``, the example
masks in ``eval/examples/``, the dataset images, ``reward_net/report.json`` and
``reward_net/val_predictions.csv``, the Tune experiment in ``tune/`` and the run facts in
``summary.json``. Nothing is segmented and no Ray cluster starts; the result is byte-identical
to what the run wrote.

Use it after changing how the report is drawn, or after `sa2va-rl run --output RUN_DIR --resume`
finished an interrupted run.

Examples:
  sa2va-rl report runs/quick
  sa2va-rl report /shared/runs/full

Exit codes: 0 rebuilt, 2 RUN_DIR is not a finished run (the message names the missing file).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="rebuild report.md, plots and summary.json of a finished run from its files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's --output directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from orchestrator.report import summary as report

    summary = report.rebuild(args.run_dir)
    print(report.comparison_table(summary))
    print(f"rebuilt {args.run_dir}: summary.json, report.md, plots/")
    return 0
