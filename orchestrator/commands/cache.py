"""``sa2va-rl cache``: what the inference cache holds per backend id, and pruning it.

Lists every backend id's entries and bytes, per format version (entries of an older format are
not read by this version and can go). With a prune option, deletes the entries matching every
option given and says how many and how much. Entries are small and immutable: deleting one
only costs its recomputation in a later run; a run in progress keeps working.

Examples:
  sa2va-rl cache                                          # ~/.cache/sa2va-rl/inference
  sa2va-rl cache --cache-dir /shared/cache
  sa2va-rl cache --prune-backend 'frangi-v3:cap-none'     # an id as listed (or its directory)
  sa2va-rl cache --prune-older-than 30                    # entries written 30+ days ago
  sa2va-rl cache --prune-other-formats                    # what this version no longer reads

Exit codes: 0 listed or pruned, 2 a prune option's value is invalid.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from models.errors import UserError
from orchestrator.config import WorkersConfig


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="show the inference cache's size per backend id; prune by backend id or age",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=WorkersConfig().cache_dir,
        help="the cache (default: %(default)s)",
    )
    parser.add_argument("--prune-backend", metavar="ID", help="delete this backend id's entries")
    parser.add_argument(
        "--prune-older-than",
        type=float,
        metavar="DAYS",
        help="delete entries written more than DAYS days ago",
    )
    parser.add_argument(
        "--prune-other-formats",
        action="store_true",
        help="delete entries of format versions this version does not read",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from orchestrator.inference.cache_store import prune

    root = Path(args.cache_dir).expanduser()
    if args.prune_older_than is not None and not args.prune_older_than >= 0:
        raise UserError(f"--prune-older-than {args.prune_older_than}: give a number of days >= 0")
    if args.prune_backend or args.prune_older_than is not None or args.prune_other_formats:
        result = prune(
            root,
            backend=args.prune_backend,
            older_than_days=args.prune_older_than,
            other_formats=args.prune_other_formats,
        )
        print(f"pruned {result.entries} entries ({_size(result.bytes)}) from {root}")
    print(usage_table(root))
    return 0


def usage_table(root: Path) -> str:
    """The cache's entries and bytes per format version and backend id, with a total line."""
    from orchestrator.inference.cache_store import cache_usage

    usage = cache_usage(root)
    if not usage:
        return f"cache {root}: empty"
    lines = [f"cache {root}", f"{'format':<16} {'entries':>9} {'size':>10}  backend id"]
    for u in usage:
        fmt = f"v{u.format_version}" + ("" if u.current else " (unused)")
        lines.append(f"{fmt:<16} {u.entries:>9,} {_size(u.bytes):>10}  {u.backend_id}")
    entries, nbytes = sum(u.entries for u in usage), sum(u.bytes for u in usage)
    lines.append(f"{'total':<16} {entries:>9,} {_size(nbytes):>10}")
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"
