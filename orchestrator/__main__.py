"""``python -m orchestrator <command>``: the same as the ``sa2va-rl`` console script."""

import sys

from orchestrator.cli import main

sys.exit(main(sys.argv[1:]))
