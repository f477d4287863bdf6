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

The generator and the presets of :mod:`models.frangi` were tuned together so that, on the
default data (160 frames, seed 0), the prompt matters image by image; ``tests/test_frangi.py``
pins those properties. Change either and re-run those tests.

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
from typing import NamedTuple

import cv2
import numpy as np

from envs.polygons import mask_to_polygons, rasterize_polygons
from envs.sample import Sample
from models.errors import UserError

IMAGE_SIZE = 512
JPEG_QUALITY = 95
DATASET_TEXT = ("blood vessel",)
NAME_PREFIX = "synth"

_MAX_BRANCHES = 90
_STEP = 3.0  # px between consecutive centre-line points
# Random streams: (seed, video, _VIDEO_STREAM) for what a video shares,
# (seed, video, _FRAME_STREAM, frame) for each frame; distinct lengths/tags never collide.
_VIDEO_STREAM, _FRAME_STREAM = 0, 1


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


@dataclass(frozen=True)
class _Tube:
    """A centre line ``points`` (N, 2) as (x, y) with a width ``widths`` (N,) at each point."""

    points: np.ndarray
    widths: np.ndarray


@dataclass(frozen=True)
class _Video:
    """What the frames of one video share."""

    tree: list[_Tube]
    catheter: _Tube | None
    background: np.ndarray  # float32 HxW in (0, 1]
    centre: np.ndarray  # (2,) heart centre, the pivot of the cardiac motion
    waves: np.ndarray  # (4, 4): per wave kx, ky, phase, amplitude of the smooth deformation
    attenuation: float  # typical contrast (per px of vessel thickness) of this video
    noise: float  # typical noise level of this video


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


# Video-level content: tree, catheter, background ---------------------------------------------


def _smooth_field(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Zero-mean, unit-ish random field varying on a scale of ``size / cells`` pixels."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Patient background: vignetting, heart shadow, rib-like bands, texture at three scales."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    image = np.full((size, size), rng.uniform(0.55, 0.72), np.float32)
    # Image-intensifier vignetting: darker towards the corners.
    image -= rng.uniform(0.1, 0.25) * (xx**2 + yy**2)
    # Heart silhouette: a large soft-edged darker ellipse.
    cx, cy = rng.uniform(-0.2, 0.2, 2)
    ax, ay = rng.uniform(0.25, 0.45, 2)
    inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2
    image -= rng.uniform(0.04, 0.12) / (1.0 + np.exp((inside - 1.0) * rng.uniform(4, 10)))
    # Rib-like bands: wide, faint, gently curved dark ridges (a large-scale clutter source).
    for _ in range(rng.integers(2, 6)):
        tilt, offset, bend = rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.5), rng.uniform(-1, 1)
        dist = yy - (offset + tilt * xx + bend * xx**2)
        half_width = rng.uniform(0.02, 0.05)
        image -= rng.uniform(0.015, 0.04) * np.exp(-((dist / half_width) ** 2))
    image += rng.uniform(0.03, 0.07) * _smooth_field(rng, 4, size)
    image += rng.uniform(0.01, 0.025) * _smooth_field(rng, 24, size)
    image += rng.uniform(0.004, 0.012) * _smooth_field(rng, 96, size)
    return np.clip(image, 0.12, 1.0)


class _Sprout(NamedTuple):
    """A vessel waiting to grow: where, in which direction, how wide, off which parent."""

    start: np.ndarray
    angle: float
    width: float
    parent: int  # label of the parent vessel in the occupancy map, -1 for the root
    parent_width: float


def _grow_tree(rng: np.random.Generator, size: int) -> list[_Tube]:
    """A branching tree from one ostium near the top; vessels never touch, so no loops.

    No loops matters: the ground truth is the set of filled *external* contours, so a loop would
    turn the background it encloses into "vessel".
    """
    occupied = np.zeros((size, size), np.int32)  # label of the vessel (plus margin) per pixel
    side = rng.choice([-1.0, 1.0])
    start = np.array([size * (0.5 + side * rng.uniform(0.1, 0.35)), size * rng.uniform(0.05, 0.25)])
    towards_centre = math.atan2(size * 0.6 - start[1], size / 2 - start[0])
    queue = [_Sprout(start, towards_centre + rng.uniform(-0.4, 0.4), rng.uniform(8.5, 11.0), -1, 0)]
    tree: list[_Tube] = []
    while queue and len(tree) < _MAX_BRANCHES:
        sprout = queue.pop(0)
        label = len(tree) + 1
        tube, children = _grow_branch(rng, sprout, label, occupied)
        if len(tube.points) >= 2:
            tree.append(tube)
            queue.extend(children)
    return tree


def _grow_branch(
    rng: np.random.Generator, sprout: _Sprout, label: int, occupied: np.ndarray
) -> tuple[_Tube, list[_Sprout]]:
    """Grow vessel ``label`` until it thins out, leaves the image or comes near another vessel.

    The vessel may overlap its parent only while it gets clear of it (it starts on the parent's
    centre line), and it marks its own path in ``occupied`` a few steps behind its tip, so it
    cannot curl into itself either. Widths taper slowly and drop at each fork by Murray's law
    (w^3 = w_parent^3 + w_child^3). Returns the tube and the side branches it spawned.
    """
    point, angle, width = sprout.start.astype(np.float64), sprout.angle, sprout.width
    clearance = 2.2 * (sprout.parent_width / 2 + width / 2 + 3)
    points, widths, children = [point], [width], []
    turn, travelled, marked = 0.0, 0.0, 1
    next_fork = rng.uniform(15, 45)
    taper = math.exp(-_STEP / rng.uniform(500, 1000))
    lag = int(width + 10) // int(_STEP) + 1
    while width >= 1.0 and len(points) < 400:
        turn = 0.9 * turn + rng.normal(0.0, 0.018)  # smoothly varying curvature
        angle += turn
        point = point + _STEP * np.array([math.cos(angle), math.sin(angle)])
        travelled += _STEP
        width = width * taper - _STEP * 0.002  # the constant term ends thin vessels
        allowed = sprout.parent if travelled <= clearance else -1
        if _blocked(occupied, point, width, allowed):
            break
        points.append(point)
        widths.append(width)
        marked = _mark(occupied, label, points, widths, marked, len(points) - lag)
        if travelled >= next_fork and width > 1.6:
            child = width * rng.uniform(0.4, 0.8)
            side = rng.choice([-1.0, 1.0])
            children.append(
                _Sprout(point, angle + side * rng.uniform(0.5, 1.1), child, label, width)
            )
            width = max(1.0, (width**3 - child**3) ** (1 / 3))
            angle -= side * rng.uniform(0.05, 0.25)  # the parent bends away from its branch
            next_fork = travelled + rng.uniform(20, 50)
    _mark(occupied, label, points, widths, marked, len(points))
    return _Tube(np.array(points), np.array(widths)), children


def _blocked(occupied: np.ndarray, point: np.ndarray, width: float, allowed: int) -> bool:
    """Whether a vessel of ``width`` at ``point`` is off the image or touches another vessel."""
    size = occupied.shape[0]
    x, y = _pt(point)
    if not (-8 <= x < size + 8 and -8 <= y < size + 8):
        return True
    r = math.ceil(width / 2) + 1
    window = occupied[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1]
    return bool(np.any((window != 0) & (window != allowed)))


def _mark(
    occupied: np.ndarray,
    label: int,
    points: list[np.ndarray],
    widths: list[float],
    start: int,
    stop: int,
) -> int:
    """Draw path segments ``start .. stop-1`` (2 px margin each side); return the next start."""
    for i in range(start, stop):
        cv2.line(occupied, _pt(points[i - 1]), _pt(points[i]), label, round(widths[i]) + 4)
    return max(start, stop)


def _grow_catheter(rng: np.random.Generator, size: int) -> _Tube:
    """A smooth, constant-width tube entering from the bottom or a side of the image."""
    edge = rng.integers(3)
    along = rng.uniform(0.2, 0.8) * size
    if edge == 0:  # bottom
        point, angle = np.array([along, size + 5.0]), -math.pi / 2
    else:  # left or right
        point = np.array([-5.0 if edge == 1 else size + 5.0, along])
        angle = 0.0 if edge == 1 else math.pi
    angle += rng.uniform(-0.4, 0.4)
    length = rng.uniform(250, 480)
    turn = rng.uniform(-0.006, 0.006)
    points = [point]
    for _ in range(int(length / _STEP)):
        turn += rng.normal(0.0, 0.0006)
        angle += turn
        point = point + _STEP * np.array([math.cos(angle), math.sin(angle)])
        points.append(point)
    width = rng.uniform(6.5, 9.5)
    return _Tube(np.array(points), np.full(len(points), width))


def _make_video(seed: int, video: int, size: int) -> _Video:
    rng = np.random.default_rng([seed, video, _VIDEO_STREAM])
    tree = _grow_tree(rng, size)
    # Every third video shows a catheter, so any 3 consecutive videos include one.
    catheter = _grow_catheter(rng, size) if video % 3 == 1 else None
    waves = np.column_stack(
        [
            rng.uniform(-1, 1, (4, 2)) * 2 * math.pi / size,  # at most one cycle per image
            rng.uniform(0, 2 * math.pi, 4),
            rng.uniform(0.5, 2.0, 4),
        ]
    )
    return _Video(
        tree=tree,
        catheter=catheter,
        background=_background(rng, size),
        centre=rng.uniform(0.35, 0.65, 2) * size,
        waves=waves,
        attenuation=float(rng.uniform(0.07, 0.13)),
        noise=float(rng.uniform(0.012, 0.03)),
    )


# Frame rendering -------------------------------------------------------------------------------


def _pt(p: np.ndarray) -> tuple[int, int]:
    return round(float(p[0])), round(float(p[1]))


def _deform(points: np.ndarray, video: _Video, phase: float, shift: np.ndarray) -> np.ndarray:
    """Cardiac-like motion: contraction about the heart centre, smooth waves, a small shift."""
    scale = 1.0 + 0.02 * math.sin(phase)
    moved = video.centre + (points - video.centre) * scale + shift
    kx, ky, wave_phase, amp = video.waves.T
    arg = points[:, :1] * kx + points[:, 1:] * ky + wave_phase + phase
    dx = (amp[:2] * np.sin(arg[:, :2])).sum(1)
    dy = (amp[2:] * np.sin(arg[:, 2:])).sum(1)
    return moved + np.column_stack([dx, dy])


def _draw_tubes(tubes: list[_Tube], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise tubes: (mask uint8 0/255, centre lines uint8 0/255, width map float32)."""
    mask = np.zeros((size, size), np.uint8)
    centre = np.zeros((size, size), np.uint8)
    width_map = np.zeros((size, size), np.float32)
    pieces = [
        (float(w), _pt(a), _pt(b))
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
    rng: np.random.Generator, video: _Video, frame: int, size: int
) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """One frame: (grey image uint8 HxW, GT polygons, GT mask bool HxW)."""
    phase = 2 * math.pi * frame / 7.0 + rng.uniform(-0.3, 0.3)  # ~7 frames per heart beat
    shift = rng.normal(0.0, 1.5, 2)
    tree = [_Tube(_deform(t.points, video, phase, shift), t.widths) for t in video.tree]
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
        tube, _, _ = _draw_tubes([_Tube(points, video.catheter.widths)], size)
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
    video: _Video | None = None
    for index in range(n):
        video_index, frame = divmod(index, frames_per_video)
        if frame == 0 or video is None:
            video = _make_video(seed, video_index, size)
        rng = np.random.default_rng([seed, video_index, _FRAME_STREAM, frame])
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
