"""From `data.*` settings to the images to train on."""

from __future__ import annotations

from pathlib import Path

from iecl.pipeline import BetonFile, ImageList, open_images
from iecl.pipeline.sources import open_beton
from iecl.pipeline.synthetic import GENERATOR_VERSION, SyntheticSpec, make_synthetic
from iecl.train.config import DataConfig


def synthetic_root(cfg: DataConfig) -> Path:
    name = f"synthetic-{cfg.synthetic_images}x{cfg.synthetic_classes}-v{GENERATOR_VERSION}"
    return Path(cfg.synthetic_cache).expanduser() / name


def resolve_images(cfg: DataConfig, progress: bool = True) -> ImageList | BetonFile:
    """The configured data, or the synthetic folder (made on first use, then
    reused; for the ffcv backend also converted once to a .beton beside it)."""
    if cfg.root:
        return open_beton(cfg.root) if cfg.backend == "ffcv" else open_images(cfg.root)
    root = synthetic_root(cfg)
    make_synthetic(root, SyntheticSpec(cfg.synthetic_images, cfg.synthetic_classes), progress=progress)
    if cfg.backend != "ffcv":
        return open_images(root)
    beton = root.with_suffix(".beton")
    if not beton.exists():
        from iecl.pipeline.ffcv import convert

        convert(open_images(root), beton, progress=progress)
    return open_beton(beton)
