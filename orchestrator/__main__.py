"""``python -m orchestrator`` is the ``sa2va-rl`` command."""

import sys

from orchestrator.cli import main

sys.exit(main())
