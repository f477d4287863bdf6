"""Built-in synthetic coronary angiograms: the default dataset when no real data is given.

Each "video" is one randomly grown vessel tree on one patient background; its frames show that
tree under a small smooth (cardiac/breathing-like) deformation, with new noise and a contrast
level that varies from frame to frame. What makes the data useful for the experiments:

- vessels are dark, tapering, branching tubes 1-12 px wide whose darkness follows their
  thickness (X-ray attenuation through a cylinder), so thin distal branches are faint and
  blurred into the noise: a plain vesselness filter misses them (recall < precision);
- backgrounds carry low-frequency shadows (vignetting, heart silhouette, rib-like bands) and
  texture, so lowering a threshold also picks up clutter;
- some frames are low-contrast (contrast agent washing out), some are noisy;
- every third video (1, 4, 7, ...) contains a catheter: a thick, uniform, smooth dark tube
  entering from the image border that is *not* part of the ground truth, a false-positive trap.

The generator and the presets of :mod:`models.frangi_presets` were tuned together so that, on the
default data (160 frames, seed 0), the prompt matters image by image; ``tests/test_frangi.py``
pins those properties. Change either and re-run those tests.

What a video shares (tree, catheter, background, motion) is in :mod:`envs.synthetic_scene`; this
module renders frames from it and writes datasets.

Generation is deterministic for a seed: every random draw comes from a ``numpy.random.Generator``
seeded from ``(seed, video)`` (what a video shares) or ``(seed, video, frame)``, so the first
``n`` samples do not depend on how many are generated in all.

On disk (:func:`write_dataset`), the layout is Sa2VA's fine-tuning format::

    OUT/annotations.json   [{"image": NAME.jpg, "text": ["blood vessel"], "mask": [[x1, y1, ...]]}]
    OUT/images/NAME.jpg    JPEG quality 95
    OUT/masks/NAME.png     exact ground truth, uint8 0/255

The ground truth *is* the rasterised polygon list (:func:`envs.polygons.rasterize_polygons`), so
the PNG, the JSON polygons and ``Sample.mask`` agree to the pixel; ``Sample.image`` is the decoded
JPEG, i.e. exactly what a loader reads back.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from envs.polygons import mask_to_polygons, rasterize_polygons
from envs.sample import Sample
from envs.synthetic_scene import FRAME_STREAM, Tube, Video, make_video, pt
from models.errors import UserError

IMAGE_SIZE = 512
JPEG_QUALITY = 95
DATASET_TEXT = ("blood vessel",)
NAME_PREFIX = "synth"


@dataclass(frozen=True)
class SyntheticFrame:
    """One generated frame with everything the writer needs.

    Attributes:
        sample: the frame as every loader returns it (``mask`` = rasterised ``polygons``).
        polygons: external contours of the vessel mask, flat int ``[x1, y1, ...]`` lists.
        jpeg: the encoded image file (``sample.image`` is this file decoded).
    """

    sample: Sample
    polygons: list[list[int]]
    jpeg: bytes


def frame_name(seed: int, video: int, frame: int) -> str:
    """File name of a frame, in the real data's ``<name>(<id>)_<a>-<b>_<c>_<hash>_frame_<n>.jpg``.

    ``<hash>`` is 8 hex digits derived from ``(seed, video)``, ``<n>`` the frame index within
    the video, e.g. ``synth(003)_1-4_2_76D3C2EE_frame_000011.jpg``.
    """
    digest = hashlib.sha256(f"{seed}:{video}".encode()).hexdigest()[:8].upper()
    series = f"1-{1 + video % 4}_{1 + video % 2}"
    return f"{NAME_PREFIX}({video:03d})_{series}_{digest}_frame_{frame:06d}.jpg"


def group_of(name: str) -> str:
    """The video a frame file belongs to: everything before ``_frame_``."""
    return name.rsplit("_frame_", 1)[0]


# Frame rendering -------------------------------------------------------------------------------


def _deform(points: np.ndarray, video: Video, phase: float, shift: np.ndarray) -> np.ndarray:
    """Cardiac-like motion: contraction about the heart centre, smooth waves, a small shift."""
    scale = 1.0 + 0.02 * math.sin(phase)
    moved = video.centre + (points - video.centre) * scale + shift
    kx, ky, wave_phase, amp = video.waves.T
    arg = points[:, :1] * kx + points[:, 1:] * ky + wave_phase + phase
    dx = (amp[:2] * np.sin(arg[:, :2])).sum(1)
    dy = (amp[2:] * np.sin(arg[:, 2:])).sum(1)
    return moved + np.column_stack([dx, dy])


def _draw_tubes(tubes: list[Tube], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise tubes: (mask uint8 0/255, centre lines uint8 0/255, width map float32)."""
    mask = np.zeros((size, size), np.uint8)
    centre = np.zeros((size, size), np.uint8)
    width_map = np.zeros((size, size), np.float32)
    pieces = [
        (float(w), pt(a), pt(b))
        for tube in tubes
        for a, b, w in zip(tube.points[:-1], tube.points[1:], tube.widths[1:], strict=True)
    ]
    # Thick pieces last, so that at a junction the width map holds the parent's width.
    for w, a, b in sorted(pieces, key=lambda piece: piece[0]):
        thickness = max(1, round(w))
        cv2.line(mask, a, b, 255, thickness)
        cv2.line(width_map, a, b, w, thickness)
        cv2.line(centre, a, b, 255, 1)
    return mask, centre, width_map


def _path_length(inside: np.ndarray, centre: np.ndarray, width_map: np.ndarray) -> np.ndarray:
    """X-ray path length through a cylinder of the local width, at each pixel of ``inside``."""
    dist = cv2.distanceTransform(255 - centre, cv2.DIST_L2, 5)
    radius = width_map / 2 + 0.5
    chord = 2 * np.sqrt(np.maximum(radius**2 - dist**2, 0.25))
    return np.where(inside, chord, 0).astype(np.float32)


def _shifted(background: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The background moved by ``shift`` px (breathing), edges replicated."""
    matrix = np.array([[1, 0, shift[0]], [0, 1, shift[1]]], np.float32)
    size = background.shape[1], background.shape[0]
    return cv2.warpAffine(
        background, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def _render(
    rng: np.random.Generator, video: Video, frame: int, size: int
) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """One frame: (grey image uint8 HxW, GT polygons, GT mask bool HxW)."""
    phase = 2 * math.pi * frame / 7.0 + rng.uniform(-0.3, 0.3)  # ~7 frames per heart beat
    shift = rng.normal(0.0, 1.5, 2)
    tree = [Tube(_deform(t.points, video, phase, shift), t.widths) for t in video.tree]
    drawn, centre, width_map = _draw_tubes(tree, size)
    polygons = mask_to_polygons(drawn)
    gt = rasterize_polygons(polygons, size, size)  # the GT is what the polygons say, exactly
    attenuation = video.attenuation * rng.uniform(0.55, 1.25)
    if rng.random() < 0.2:  # contrast washing out: a hard frame
        attenuation *= rng.uniform(0.35, 0.6)
    # Beer-Lambert: log intensity drops with the path length through contrast-filled vessels.
    log_image = np.log(_shifted(video.background, shift))
    log_image -= attenuation * _path_length(gt, centre, width_map)
    if video.catheter is not None:
        points = _deform(video.catheter.points, video, phase, shift)
        tube, _, _ = _draw_tubes([Tube(points, video.catheter.widths)], size)
        # Flat profile: a plastic tube full of contrast is uniformly dark across its width.
        log_image -= 0.045 * float(video.catheter.widths[0]) * (tube > 0)
    image = cv2.GaussianBlur(np.exp(log_image), (0, 0), rng.uniform(0.7, 1.2))  # focal spot
    noise = video.noise * rng.uniform(0.7, 1.4)  # quantum noise grows with the signal
    image += noise * np.sqrt(image / 0.5) * rng.standard_normal(image.shape).astype(np.float32)
    grey = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    return grey, polygons, gt


def iter_frames(
    n: int, seed: int = 0, frames_per_video: int = 8, size: int = IMAGE_SIZE
) -> Iterator[SyntheticFrame]:
    """Yield ``n`` frames, ``frames_per_video`` per video (the last video may be shorter).

    Raises ``ValueError`` for ``n < 0``, ``seed < 0`` or ``frames_per_video < 1``.
    """
    if n < 0 or seed < 0 or frames_per_video < 1:
        raise ValueError(
            f"need n >= 0, seed >= 0 and frames_per_video >= 1, got {n}, {seed}, {frames_per_video}"
        )
    video: Video | None = None
    for index in range(n):
        video_index, frame = divmod(index, frames_per_video)
        if frame == 0 or video is None:
            video = make_video(seed, video_index, size)
        rng = np.random.default_rng([seed, video_index, FRAME_STREAM, frame])
        grey, polygons, gt = _render(rng, video, frame, size)
        jpeg, decoded = _jpeg_round_trip(grey)
        name = frame_name(seed, video_index, frame)
        sample = Sample(
            id=name,
            group=group_of(name),
            image=np.repeat(decoded[:, :, None], 3, axis=2),
            mask=gt,
        )
        yield SyntheticFrame(sample=sample, polygons=polygons, jpeg=jpeg)


def _jpeg_round_trip(grey: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The JPEG file of ``grey`` and its decoded pixels (what a dataset loader will see)."""
    ok, encoded = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    decoded = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE) if ok else None
    if decoded is None:
        raise RuntimeError("OpenCV failed to encode or decode a JPEG")
    return encoded.tobytes(), decoded


def generate_samples(n: int, seed: int = 0, frames_per_video: int = 8) -> list[Sample]:
    """``n`` synthetic angiogram samples in memory, identical to what :func:`write_dataset` writes.

    Images are 512x512 uint8 RGB (grey, R=G=B), masks bool; ``Sample.group`` is the video.
    """
    return [frame.sample for frame in iter_frames(n, seed, frames_per_video)]


# Writing -------------------------------------------------------------------------------------


def write_dataset(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    frames_per_video: int = 8,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``n`` frames to ``out_dir`` in Sa2VA's layout (see module docstring); return the path.

    The dataset is built in a hidden directory beside ``out_dir`` and renamed into place, so an
    interrupted run never leaves a half-written dataset behind. Raises :class:`UserError` if
    ``out_dir`` exists and is not an empty directory, unless ``overwrite`` is set (then it is
    replaced). ``progress`` shows a progress bar on stderr.
    """
    out = Path(out_dir)
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write_into(staging, n, seed, frames_per_video, progress)
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; OUT should not be
        _replace(out, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replace(out: Path, staging: Path) -> None:
    """Move ``staging`` to ``out``, moving an existing ``out`` aside first and deleting it after."""
    if not out.exists() and not out.is_symlink():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / out.name
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old.parent, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists() or overwrite:
        return
    if not out.is_dir():
        raise UserError(
            f"output path {out} exists and is a file: choose a new or empty directory, or pass "
            "--overwrite to replace it"
        )
    if any(out.iterdir()):
        raise UserError(
            f"output directory {out} is not empty: choose a new or empty directory, or pass "
            "--overwrite to replace its contents"
        )


def _write_into(staging: Path, n: int, seed: int, frames_per_video: int, progress: bool) -> None:
    from tqdm import tqdm

    (staging / "images").mkdir()
    (staging / "masks").mkdir()
    entries = []
    frames = tqdm(
        iter_frames(n, seed, frames_per_video),
        total=n,
        desc="synthetic angiograms",
        unit="img",
        file=sys.stderr,
        disable=not progress,
    )
    for frame in frames:
        name = frame.sample.id
        (staging / "images" / name).write_bytes(frame.jpeg)
        assert frame.sample.mask is not None
        ok, png = cv2.imencode(".png", frame.sample.mask.astype(np.uint8) * 255)
        if not ok:
            raise RuntimeError(f"OpenCV failed to encode the mask of {name} as PNG")
        (staging / "masks" / (Path(name).stem + ".png")).write_bytes(png.tobytes())
        entries.append({"image": name, "text": list(DATASET_TEXT), "mask": frame.polygons})
    (staging / "annotations.json").write_text(json.dumps(entries, separators=(",", ":")))
