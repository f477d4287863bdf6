"""``sa2va-rl check-data DIR``: validate a dataset, show its groups and split, write the manifest.

Run it before any long job: every image is decoded once, and every problem (missing, unreadable
or truncated image, bad polygon, mask of the wrong size, duplicate name, malformed JSON) is
listed with the file and what to do. Example::

    sa2va-rl check-data data/angio --split-out runs/angio-split.json --seed 0

prints the format, image and group counts, how many images have ground truth, skipped entries
(with ``--skip-bad``) and the train/val/test sizes; exits 2 with the message on bad data.
"""

from __future__ import annotations

import argparse
from typing import Any

from envs.datasets import DEFAULT_GROUP_PATTERN, FORMATS

NO_GROUPS = "none"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check-data",
        help="validate a dataset, show its video groups and split, optionally save the split",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", metavar="DIR", help="dataset folder or annotations JSON file")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="dataset format: annotations.json (sa2va), COCO JSON (coco), images/+masks/ "
        "(folders); auto detects, preferring sa2va (default: %(default)s)",
    )
    parser.add_argument(
        "--group-pattern",
        default=DEFAULT_GROUP_PATTERN,
        metavar="RE",
        help="regex with a named group 'group' applied to each file name without extension; "
        f"frames of one group stay in one split; '{NO_GROUPS}' = one group per image "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip bad entries (listed) instead of failing"
    )
    parser.add_argument(
        "--allow-unlabelled",
        action="store_true",
        help="accept images without ground truth (their mask is None) instead of reporting them",
    )
    parser.add_argument(
        "--category",
        action="append",
        metavar="NAME",
        help="COCO only: use only annotations of this category name (repeatable)",
    )
    parser.add_argument("--split-out", metavar="FILE", help="write the split manifest (JSON) here")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    parser.add_argument(
        "--fractions",
        type=_fractions,
        default=(0.7, 0.15, 0.15),
        metavar="TRAIN,VAL,TEST",
        help="split fractions of images, summing to 1 (default: 0.7,0.15,0.15)",
    )
    parser.set_defaults(func=run)


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not three numbers like 0.7,0.15,0.15"
        ) from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} must be three numbers like 0.7,0.15,0.15")
    return values


def run(args: argparse.Namespace) -> int:
    from envs.datasets import format_problems, load_dataset
    from envs.split import split_dataset, write_manifest

    pattern = None if args.group_pattern == NO_GROUPS else args.group_pattern
    dataset = load_dataset(
        args.path,
        fmt=args.format,
        group_pattern=pattern,
        skip_bad=args.skip_bad,
        require_masks=not args.allow_unlabelled,
        categories=args.category,
    )
    groups = dataset.groups()
    sizes = sorted(len(ids) for ids in groups.values())
    with_masks = sum(dataset.has_mask(i) for i in dataset.ids)
    print(f"dataset:  {dataset.root} ({dataset.format})")
    print(
        f"images:   {len(dataset)} ({with_masks} with ground truth, "
        f"{len(dataset) - with_masks} without)"
    )
    print(
        f"groups:   {len(groups)} (images per group: min {sizes[0]}, "
        f"median {sizes[len(sizes) // 2]}, max {sizes[-1]})"
    )
    for note in dataset.notes:
        print(f"note:     {note}")
    if dataset.skipped:
        print(f"skipped:  {len(dataset.skipped)} bad entries\n{format_problems(dataset.skipped)}")
    split = split_dataset(dataset, args.fractions, args.seed)
    for name, ids in zip(split._fields, split, strict=True):
        share = len(ids) / len(dataset)
        n_groups = len({dataset.group_of(i) for i in ids})
        print(f"{name + ':':9} {len(ids)} images ({share:.1%}), {n_groups} groups")
    if args.split_out:
        manifest = write_manifest(
            args.split_out, dataset, split, args.seed, args.fractions, pattern
        )
        print(f"manifest: {args.split_out} (manifest_hash {manifest.manifest_hash[:12]})")
    return 0
