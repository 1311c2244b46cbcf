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
    `bad_entries` are the folder entries that could not even be listed (a
    symlink loop, an unreadable directory): (name relative to the root, reason);
    they are not samples, and every command reports them with the unreadable images.
    """

    root: str
    samples: list[tuple[str, int]]  # (path, label)
    classes: list[str] = field(default_factory=list)  # empty for unlabeled data
    spans: list[tuple[int, int]] | None = None  # (offset, size) inside the path, for tar members
    members: list[str] | None = None  # member names inside the tar, for messages
    bad_entries: list[tuple[str, str]] = field(default_factory=list)

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

    @property
    def base(self) -> str:
        """The folder names are relative to: the root folder, or the folder of a
        file list, a tar shard or a shard pattern."""
        return self.root if os.path.isdir(self.root) else os.path.dirname(self.root) or os.curdir

    def relative_name(self, i: int) -> str:
        """Image `i`'s name relative to `base` (shard.tar:member for tar members):
        the same string in every backend's `bad_files`, on every machine."""
        return relative_to(self.base, self.name(i))


def relative_to(base: str, name: str) -> str:
    rel = os.path.relpath(name, base)
    return name if rel.startswith(os.pardir) else rel


def _listing(directory: str, root: str, bad: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) of `directory`, sorted, hidden ones left
    out; what cannot be listed or looked at (permissions, symlink loops) goes
    to `bad` as (name relative to `root`, reason) instead of raising."""
    try:
        with os.scandir(directory) as entries:
            listed = [e for e in entries if not e.name.startswith(".")]
    except OSError as err:
        bad.append((relative_to(root, directory), f"cannot list the folder: {err.strerror or err}"))
        return [], []
    dirs, files = [], []
    for entry in listed:
        try:
            if entry.is_dir():
                dirs.append(entry.name)
            elif entry.is_file():
                files.append(entry.name)
        except OSError as err:  # ELOOP and the like; a dangling symlink is neither, silently
            bad.append((relative_to(root, entry.path), f"cannot open: {err.strerror or err}"))
    return sorted(dirs), sorted(files)


def _images(names: list[str]) -> list[str]:
    return [n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]


def scan_image_folder(root: str | os.PathLike) -> ImageList:
    """List the images under `root`; a clear `DataError` if there are none."""
    root = str(Path(root).expanduser())
    if not os.path.exists(root):
        raise DataError(f"data folder {root} does not exist; set data.root to an ImageNet-style folder")
    if not os.path.isdir(root):
        raise DataError(f"data.root {root} is not a folder")
    bad: list[tuple[str, str]] = []
    class_dirs, top_files = _listing(root, root, bad)
    if bad and not class_dirs and not top_files:
        raise DataError(f"cannot read the data folder {root}: {bad[0][1]}")
    samples: list[tuple[str, int]] = []
    classes: list[str] = []
    for name in class_dirs:
        images = _images(_listing(os.path.join(root, name), root, bad)[1])
        if images:
            samples.extend((os.path.join(root, name, image), len(classes)) for image in images)
            classes.append(name)
    if not samples:
        samples = [(os.path.join(root, image), UNLABELED) for image in _images(top_files)]
    if not samples:
        found = f"; unreadable: {bad[0][0]} ({bad[0][1]})" if bad else ""
        raise DataError(
            f"no images found in {root}: expected {root}/<class>/<image>.JPEG or images directly in it "
            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}){found}"
        )
    return ImageList(root, samples, classes, bad_entries=sorted(bad))
