"""``sa2va-rl demo-data OUT``: write the built-in synthetic angiogram dataset to a directory."""

from __future__ import annotations

import argparse

DEFAULT_N = 160
DEFAULT_SEED = 0
DEFAULT_FRAMES_PER_VIDEO = 8

DESCRIPTION = """\
Write the built-in synthetic coronary angiogram dataset: the default dataset of every run that
names no real data, and a quick way to try the pipeline without any download.

What is in it: 512x512 grey X-ray-like frames with dark, tapering, branching vessel trees
(1-12 px wide) on textured backgrounds with shadows, blur and noise; contrast varies from frame
to frame (some frames are hard, low-contrast ones); every third video shows a catheter, a thick
uniform tube that is NOT part of the ground truth (a false-positive trap). Frames come in
"videos" of K frames that show the same tree slightly deformed, so splits must keep a video
together (the file names say which video a frame belongs to).

Layout (Sa2VA's fine-tuning format):
  OUT/annotations.json  [{"image": NAME.jpg, "text": ["blood vessel"], "mask": [[x1, y1, ...]]}]
  OUT/images/NAME.jpg   JPEG quality 95, NAME like synth(003)_1-4_2_76D3C2EE_frame_000005
  OUT/masks/NAME.png    ground truth, 0/255; identical to the rasterised polygons

The same seed always gives the same files. OUT is written atomically (built next to it, then
renamed); an existing non-empty OUT is refused unless --overwrite is given."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo-data`` subcommand."""
    parser = subparsers.add_parser(
        "demo-data",
        help="write the built-in synthetic angiogram dataset (the default dataset)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", metavar="OUT", help="directory to create (must be new or empty)")
    parser.add_argument(
        "--n",
        type=_positive_int,
        default=DEFAULT_N,
        help=f"number of frames (default: {DEFAULT_N})",
    )
    parser.add_argument(
        "--seed",
        type=_non_negative_int,
        default=DEFAULT_SEED,
        help=f"random seed; equal seeds give identical files (default: {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--frames-per-video",
        type=_positive_int,
        default=DEFAULT_FRAMES_PER_VIDEO,
        metavar="K",
        help=f"frames per video, the last video may be shorter (default: "
        f"{DEFAULT_FRAMES_PER_VIDEO})",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it exists and is not empty",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the dataset and print a one-line summary."""
    from envs.synthetic import write_dataset

    out = write_dataset(
        args.out,
        n=args.n,
        seed=args.seed,
        frames_per_video=args.frames_per_video,
        overwrite=args.overwrite,
    )
    videos = -(-args.n // args.frames_per_video)
    print(
        f"wrote {args.n} images from {videos} video{'s' if videos != 1 else ''} "
        f"(seed {args.seed}) to {out}"
    )
    return 0


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
