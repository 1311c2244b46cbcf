"""From `data.*` settings to the list of images to train on."""

from __future__ import annotations

from pathlib import Path

from pipeline import ImageList, scan_image_folder
from pipeline.synthetic import GENERATOR_VERSION, SyntheticSpec, make_synthetic
from train.config import DataConfig


def synthetic_root(cfg: DataConfig) -> Path:
    name = f"synthetic-{cfg.synthetic_images}x{cfg.synthetic_classes}-v{GENERATOR_VERSION}"
    return Path(cfg.synthetic_cache).expanduser() / name


def resolve_images(cfg: DataConfig, progress: bool = True) -> ImageList:
    """The configured folder, or the synthetic one (made on first use, then reused)."""
    if cfg.root:
        return scan_image_folder(cfg.root)
    root = synthetic_root(cfg)
    make_synthetic(root, SyntheticSpec(cfg.synthetic_images, cfg.synthetic_classes), progress=progress)
    return scan_image_folder(root)
