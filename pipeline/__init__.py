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

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the annotations' names, for type checkers only (imports stay lazy)
    from iecl.pipeline.folder import ImageList
    from iecl.pipeline.sources import BetonFile
    from iecl.pipeline.spec import Loader, LoaderSpec

BACKENDS = ("pil", "dali", "ffcv")

#: What this package exports, and the module each comes from. They are imported
#: on first use (PEP 562), so `import iecl.pipeline.errors` (every command's
#: error base) does not import torch, and `iecl --help` and argument errors stay fast.
_EXPORTS = {
    "RECIPES": "augment", "DataError": "errors", "ImageList": "folder", "scan_image_folder": "folder",
    "BetonFile": "sources", "open_images": "sources", "BatchPlan": "spec", "DaliOptions": "spec",
    "Loader": "spec", "LoaderSpec": "spec", "MEAN_255": "views", "STD_255": "views", "ViewBatch": "views",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # once: later lookups are plain
    return value


def build_loader(images: ImageList | BetonFile, spec: LoaderSpec, progress: bool = True) -> Loader:
    """The `spec.backend` loader over `images` (an `ImageList`; a `BetonFile` for ffcv).
    `progress`: a bar for set-up work that takes a while (DALI's image index)."""
    from iecl.pipeline.errors import DataError
    from iecl.pipeline.sources import BetonFile

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
