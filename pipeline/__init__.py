"""Data: dataset discovery, synthetic datasets, two-view loaders.

Every loader backend sits behind one interface: iterate -> `ViewBatch` (two
uint8 NHWC views and labels, on the training device), `len()` (full batches
per epoch, the same every epoch), `set_epoch(epoch, start_batch=0)`.
`build_loader` picks the backend named by `data.backend`.
"""

from __future__ import annotations

import torch

from pipeline.augment import RECIPES, get_recipe
from pipeline.errors import DataError
from pipeline.folder import ImageList, scan_image_folder
from pipeline.views import MEAN_255, STD_255, ViewBatch

BACKENDS = ("pil",)


def build_loader(
    backend: str,
    images: ImageList,
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
):
    recipes = get_recipe(recipe, crop_scale)
    if backend == "pil":
        from pipeline.reference import ReferenceLoader

        return ReferenceLoader(
            images,
            recipes=recipes,
            batch_size=batch_size,
            image_size=image_size,
            seed=seed,
            workers=workers,
            device=device,
            rank=rank,
            world_size=world_size,
        )
    raise ValueError(f"unknown data backend {backend!r}; choose one of {BACKENDS}")


__all__ = [
    "BACKENDS",
    "MEAN_255",
    "RECIPES",
    "STD_255",
    "DataError",
    "ImageList",
    "ViewBatch",
    "build_loader",
    "scan_image_folder",
]
