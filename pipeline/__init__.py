"""Data: dataset discovery, synthetic datasets, two-view loaders.

Every loader backend sits behind one interface: iterate -> `ViewBatch` (two
uint8 NHWC views and labels, on the training device), `len()` (full batches
per epoch, the same every epoch), `set_epoch(epoch, start_batch=0)`.
A backend also keeps `bad_files` (names of unreadable images it met and
replaced by the next readable one) and has `close()`. `build_loader` picks
the backend named by `data.backend`; `open_images` lists a data.root.
"""

from __future__ import annotations

import torch

from iecl.pipeline.augment import RECIPES, get_recipe
from iecl.pipeline.errors import DataError
from iecl.pipeline.folder import ImageList, scan_image_folder
from iecl.pipeline.sources import BetonFile, open_images
from iecl.pipeline.views import MEAN_255, STD_255, ViewBatch

BACKENDS = ("pil", "dali", "ffcv")


def build_loader(
    backend: str,
    images: ImageList | BetonFile,
    *,
    batch_size: int,
    image_size: int,
    recipe: str,
    crop_scale: tuple[float, float] | None,
    seed: int,
    workers: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    decode: str = "shared",
):
    """The `backend` loader over `images` (an `ImageList`; a `BetonFile` for ffcv)."""
    common = {
        "recipes": get_recipe(recipe, crop_scale),
        "batch_size": batch_size,
        "image_size": image_size,
        "seed": seed,
        "workers": workers,
        "device": device,
        "rank": rank,
        "world_size": world_size,
    }
    if backend == "ffcv":
        if not isinstance(images, BetonFile):
            raise DataError(f"data.backend=ffcv reads .beton files; convert first: iecl convert {images.root} OUT.beton")
        from iecl.pipeline.ffcv import FfcvLoader

        return FfcvLoader(images.path, **common)
    if isinstance(images, BetonFile):
        raise DataError(f"{images.path} is an FFCV file: set data.backend=ffcv")
    if backend == "pil":
        from iecl.pipeline.reference import ReferenceLoader

        return ReferenceLoader(images, **common)
    if backend == "dali":
        from iecl.pipeline.dali import DaliLoader

        return DaliLoader(images, decode=decode, **common)
    raise ValueError(f"unknown data backend {backend!r}; choose one of {BACKENDS}")


__all__ = [
    "BACKENDS",
    "MEAN_255",
    "RECIPES",
    "STD_255",
    "BetonFile",
    "DataError",
    "ImageList",
    "ViewBatch",
    "build_loader",
    "open_images",
    "scan_image_folder",
]
