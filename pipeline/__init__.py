"""Data: dataset discovery, synthetic datasets, two-view loaders.

Every loader backend sits behind one interface (`spec.Loader`): iterate ->
`ViewBatch` (two uint8 NHWC views and labels, on the training device),
`len()` (full batches per epoch, the same every epoch),
`set_epoch(epoch, start_batch=0)`, `bad_files` (each unreadable image it met
and replaced by the next readable one, once, as "name relative to the data
root (reason)", the same string in every backend; first the folder entries
that could not be listed) and `close()`. `build_loader` builds the backend a
`LoaderSpec` names; `open_images` lists a data.root. Every backend draws the
same view parameters for a sample (`draws`), decides readability the same way
(`decode.inspect_image`) and starts workers that die with it (`lifetime`).
"""

from __future__ import annotations

from iecl.pipeline.augment import RECIPES
from iecl.pipeline.errors import DataError
from iecl.pipeline.folder import ImageList, scan_image_folder
from iecl.pipeline.sources import BetonFile, open_images
from iecl.pipeline.spec import BatchPlan, DaliOptions, Loader, LoaderSpec
from iecl.pipeline.views import MEAN_255, STD_255, ViewBatch

BACKENDS = ("pil", "dali", "ffcv")


def build_loader(images: ImageList | BetonFile, spec: LoaderSpec, progress: bool = True) -> Loader:
    """The `spec.backend` loader over `images` (an `ImageList`; a `BetonFile` for ffcv).
    `progress`: a bar for set-up work that takes a while (DALI's image index)."""
    if spec.backend == "ffcv":
        if not isinstance(images, BetonFile):
            raise DataError(f"data.backend=ffcv reads .beton files; convert first: iecl convert {images.root} OUT.beton")
        from iecl.pipeline.ffcv import FfcvLoader

        return FfcvLoader(images.path, spec.plan)
    if isinstance(images, BetonFile):
        raise DataError(f"{images.path} is an FFCV file: set data.backend=ffcv")
    if spec.backend == "pil":
        from iecl.pipeline.reference import ReferenceLoader

        return ReferenceLoader(images, spec.plan)
    if spec.backend == "dali":
        from iecl.pipeline.dali import DaliLoader

        return DaliLoader(images, spec.plan, decode=spec.decode, options=spec.dali, progress=progress)
    raise ValueError(f"unknown data backend {spec.backend!r}; choose one of {BACKENDS}")


__all__ = [
    "BACKENDS",
    "MEAN_255",
    "RECIPES",
    "STD_255",
    "BatchPlan",
    "BetonFile",
    "DaliOptions",
    "DataError",
    "ImageList",
    "Loader",
    "LoaderSpec",
    "ViewBatch",
    "build_loader",
    "open_images",
    "scan_image_folder",
]
