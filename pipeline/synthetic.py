"""Synthetic ImageNet-style JPEG folders: `root/<class>/<class>_<index>.JPEG`.

The images are meant to load a decoder and an augmentation pipeline the way
ImageNet does, so they have ImageNet-like sizes and aspect ratios (mostly
500 px on the long side, 4:3 and 3:2, a quarter portrait, some larger or
smaller) and JPEG-realistic content: smooth structures (gradients, shapes in
class colours) plus multi-scale texture, never pure noise, about 100 KB each at
quality 90. Classes differ in palette and shape vocabulary so that a kNN
monitor has something to find. Image `i` depends only on `(seed, i)`, so a
folder is reproducible and can be generated in parallel.

The folder is built under a temporary name and renamed into place at the end,
with a `manifest.json` naming its spec: an interrupted run leaves no folder
that looks complete, and a matching manifest means the folder can be reused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from iecl.pipeline.errors import DataError

MANIFEST = "manifest.json"
GENERATOR_VERSION = 1
GRAIN = 22  # per-pixel noise amplitude: sets the JPEG size (~100 KB at 500x375, q90)

# (long side, short/long) choices and weights, roughly ImageNet's mix.
_LONG_SIDES = np.array([500, 500, 500, 500, 500, 375, 400, 640, 800, 333])
_ASPECTS = np.array([3 / 4, 2 / 3, 3 / 4, 1.0, 9 / 16, 4 / 5])
_ASPECT_WEIGHTS = np.array([0.45, 0.2, 0.1, 0.1, 0.08, 0.07])


@dataclass(frozen=True)
class SyntheticSpec:
    images: int
    classes: int
    seed: int = 0
    quality: int = 90
    version: int = GENERATOR_VERSION

    def class_name(self, label: int) -> str:
        return f"class_{label:04d}"

    def relative_path(self, index: int) -> str:
        cls = self.class_name(index % self.classes)
        return f"{cls}/{cls}_{index:07d}.JPEG"


def _class_style(seed: int, label: int) -> tuple[np.ndarray, int]:
    """Per-class palette (3 RGB colours) and shape kind."""
    rng = np.random.default_rng([seed, 1_000_003, label])
    hue0 = rng.uniform(0, 1)
    hues = (hue0 + np.array([0.0, 0.12, 0.5])) % 1.0
    sat, val = rng.uniform(0.45, 0.9, 3), rng.uniform(0.45, 0.95, 3)
    palette = np.stack([_hsv_to_rgb(h, s, v) for h, s, v in zip(hues, sat, val)])
    return palette.astype(np.float32), int(rng.integers(0, 3))


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb) * 255.0


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    long_side = int(rng.choice(_LONG_SIDES))
    short = round(long_side * rng.choice(_ASPECTS, p=_ASPECT_WEIGHTS))
    return (short, long_side) if rng.uniform() < 0.25 else (long_side, short)  # (w, h)


def _fractal_noise(rng: np.random.Generator, width: int, height: int, octaves: tuple) -> np.ndarray:
    """Sum of random RGB grids upsampled bicubically: smooth at coarse cells, texture at fine ones.

    `octaves` holds (cell size in pixels, amplitude in grey levels). Each grid is
    resized as one uint8 RGB image (the fast path in PIL), offset around 128.
    """
    total = np.zeros((height, width, 3), np.int16)
    for cell, amplitude in octaves:
        gw, gh = max(2, width // cell + 2), max(2, height // cell + 2)
        grid = np.clip(128 + rng.normal(0.0, amplitude, (gh, gw, 3)), 0, 255).astype(np.uint8)
        layer = Image.fromarray(grid).resize((width, height), Image.BICUBIC)
        total += np.asarray(layer, np.int16) - 128
    return total


def render_image(spec: SyntheticSpec, index: int) -> Image.Image:
    """Image `index` of the dataset `spec`, as an RGB PIL image."""
    label = index % spec.classes
    palette, shape_kind = _class_style(spec.seed, label)
    rng = np.random.default_rng([spec.seed, index])
    width, height = _image_size(rng)

    # Background: a linear gradient between two palette colours, plus smooth noise.
    angle = rng.uniform(0, 2 * math.pi)
    xs = np.linspace(0.0, np.cos(angle), width, dtype=np.float32)
    ys = np.linspace(0.0, np.sin(angle), height, dtype=np.float32)
    ramp = ((ys[:, None] + xs[None, :]) / 2.0 + 0.5)[..., None]  # (h, w, 1), within [0, 1]
    background = palette[0] * (1 - ramp) + palette[1] * ramp
    background += _fractal_noise(rng, width, height, ((96, 28.0), (24, 12.0)))
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))

    # Foreground: class-specific shapes in jittered class colours.
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 8))):
        colour = palette[int(rng.integers(0, 3))] + rng.normal(0, 18, 3)
        fill = tuple(int(c) for c in np.clip(colour, 0, 255))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.06, 0.3) * min(width, height)
        if shape_kind == 0:
            draw.ellipse([cx - radius, cy - radius * rng.uniform(0.5, 1.0), cx + radius, cy + radius], fill=fill)
        elif shape_kind == 1:
            n = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            draw.polygon([(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles], fill=fill)
        else:
            dx, dy = radius * math.cos(angle + rng.normal(0, 0.3)), radius * math.sin(angle + rng.normal(0, 0.3))
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fill, width=int(radius / 3) + 1)
    canvas = canvas.filter(ImageFilter.SMOOTH)  # soften shape edges as a lens would

    # Texture: fine-grained detail, the part of a photo a JPEG spends its bytes on.
    texture = _fractal_noise(rng, width, height, ((4, 12.0),))
    texture += rng.integers(-GRAIN, GRAIN + 1, (height, width, 3), dtype=np.int16)  # sensor grain
    pixels = np.asarray(canvas, np.int16) + texture
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_one(args: tuple[SyntheticSpec, str, int]) -> int:
    spec, root, index = args
    path = os.path.join(root, spec.relative_path(index))
    render_image(spec, index).save(path, format="JPEG", quality=spec.quality)
    return os.path.getsize(path)


def read_manifest(root: Path) -> SyntheticSpec | None:
    try:
        data = json.loads((root / MANIFEST).read_text())
        return SyntheticSpec(**data)
    except (OSError, ValueError, TypeError):
        return None


def make_synthetic(
    root: str | os.PathLike,
    spec: SyntheticSpec,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Write the dataset `spec` to `root`; reuse it if `root` already holds exactly that.

    Returns {"root", "images", "classes", "bytes", "reused"}.
    """
    root = Path(root).expanduser()
    if spec.images < 1 or spec.classes < 1:
        raise DataError(f"a synthetic dataset needs at least 1 image and 1 class, got {spec.images} and {spec.classes}")
    if spec.classes > spec.images:
        raise DataError(f"{spec.classes} classes need at least as many images, got {spec.images}")
    if read_manifest(root) == spec:
        return {"root": str(root), "images": spec.images, "classes": spec.classes, "bytes": None, "reused": True}
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise DataError(
            f"{root} exists and is not the synthetic dataset asked for; choose another directory or pass --overwrite"
        )
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(f"{root}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        for label in range(spec.classes):
            (staging / spec.class_name(label)).mkdir(parents=True)
    except OSError as err:
        raise DataError(f"cannot create the synthetic dataset at {root}: {err.strerror or err}") from None

    total = _render_all(spec, staging, workers, progress)
    (staging / MANIFEST).write_text(json.dumps(asdict(spec), indent=1))
    if root.exists():
        shutil.rmtree(root)
    os.replace(staging, root)
    return {"root": str(root), "images": spec.images, "classes": spec.classes, "bytes": total, "reused": False}


def _render_all(spec: SyntheticSpec, staging: Path, workers: int | None, progress: bool) -> int:
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    jobs = [(spec, str(staging), i) for i in range(spec.images)]
    bar = tqdm(total=spec.images, desc="making synthetic images", unit="img", disable=not progress)
    total = 0
    with bar:
        if workers == 1:
            sizes = map(_write_one, jobs)
        else:
            pool = ProcessPoolExecutor(workers)
            sizes = pool.map(_write_one, jobs, chunksize=16)
        for done, size in enumerate(sizes, 1):
            total += size
            bar.update()
            bar.set_postfix(avg_kb=f"{total / done / 1024:.0f}", refresh=False)
        if workers != 1:
            pool.shutdown()
    return total
