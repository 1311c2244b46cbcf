"""Finding the images of a dataset folder.

Two layouts: ImageNet's `root/<class>/<image>` (labels are the sorted class
folder names' indices) and a flat `root/<image>` folder of unlabeled images
(label -1: self-supervised users mostly have no classes). Files are listed in
sorted order so that an index means the same image on every machine and rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from iecl.pipeline.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
UNLABELED = -1


@dataclass
class ImageList:
    """The images of a dataset, in a fixed order: index i means the same image everywhere.

    A sample is a whole file, or (for tar shards) `spans[i] = (offset, size)`
    bytes inside the file `samples[i][0]`. Every backend reads through `read`.
    """

    root: str
    samples: list[tuple[str, int]]  # (path, label)
    classes: list[str] = field(default_factory=list)  # empty for unlabeled data
    spans: list[tuple[int, int]] | None = None  # (offset, size) inside the path, for tar members
    members: list[str] | None = None  # member names inside the tar, for messages

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> bytes:
        """The encoded bytes of image `i` (an `OSError` if they cannot be read)."""
        path = self.samples[i][0]
        with open(path, "rb") as f:
            if self.spans is None:
                return f.read()
            offset, size = self.spans[i]
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.name(i)}: tar shard ends {size - len(data)} bytes early")
        return data

    def name(self, i: int) -> str:
        """How to name image `i` to a person: its path, or shard.tar:member."""
        path = self.samples[i][0]
        return path if self.members is None else f"{path}:{self.members[i]}"


def _images_in(directory: str) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(
            e.path
            for e in entries
            if e.is_file() and not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        )


def scan_image_folder(root: str | os.PathLike) -> ImageList:
    """List the images under `root`; a clear `DataError` if there are none."""
    root = str(Path(root).expanduser())
    if not os.path.exists(root):
        raise DataError(f"data folder {root} does not exist; set data.root to an ImageNet-style folder")
    if not os.path.isdir(root):
        raise DataError(f"data.root {root} is not a folder")
    try:
        with os.scandir(root) as entries:
            class_dirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        samples: list[tuple[str, int]] = []
        classes: list[str] = []
        for name in class_dirs:
            images = _images_in(os.path.join(root, name))
            if images:
                samples.extend((path, len(classes)) for path in images)
                classes.append(name)
        if not samples:
            samples = [(path, UNLABELED) for path in _images_in(root)]
    except PermissionError as err:
        raise DataError(f"cannot read {err.filename}: permission denied") from None
    if not samples:
        raise DataError(
            f"no images found in {root}: expected {root}/<class>/<image>.JPEG or images directly in it "
            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return ImageList(root, samples, classes)
