"""Where a dataset's images come from: a folder, a file list, or tar shards.

`open_images(spec)` turns what a user typed as `data.root` into an `ImageList`:

- a folder: ImageNet's `root/<class>/<image>` or a flat folder of unlabeled
  images (`pipeline/folder.py`);
- a file list (`*.txt`, `*.lst`, `*.csv`): one image per line, `path` or
  `path label` (whitespace or comma separated; label an integer or a class
  name), paths relative to the list's folder, `#` comments;
- webdataset-style tar shards: a `.tar` file, a folder holding only `.tar`
  files, or a brace pattern `shards/train-{0000..0146}.tar`. Members sharing a
  key (the name up to the first dot) are one sample: an image (`.jpg`,
  `.jpeg`, `.png`, `.webp`) and, optionally, a `.cls` member with its integer
  label. Images are read straight out of the shard (offset, size): nothing is
  unpacked, which is what a network file system wants.

The order is fixed (sorted files, shard order, member order) so that an index
means the same image on every rank and machine.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from iecl.pipeline.errors import DataError
from iecl.pipeline.folder import (
    IMAGE_EXTENSIONS,
    UNLABELED,
    ImageList,
    scan_image_folder,
)

LIST_SUFFIXES = frozenset({".txt", ".lst", ".csv"})
TAR_IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class BetonFile:
    """An FFCV `.beton` (made by `iecl convert`): what the ffcv backend reads."""

    path: str
    size: int

    @property
    def root(self) -> str:
        return self.path

    def __len__(self) -> int:
        return self.size


def open_beton(path: str | os.PathLike) -> BetonFile:
    from iecl.pipeline.ffcv import beton_info

    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise DataError(f"FFCV file {path} does not exist; make it with: iecl convert DATA_DIR {path}")
    return BetonFile(path, int(beton_info(path)["samples"]))


def open_images(spec: str | os.PathLike) -> ImageList:
    """The images named by `spec` (folder, file list, tar shard(s)); a clear
    `DataError` when there are none or they cannot be listed."""
    spec = os.path.expanduser(str(spec))
    if _BRACES.search(spec):
        return scan_tar_shards(expand_braces(spec), spec)
    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".tar":
        return scan_tar_shards([str(path)], spec)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return read_file_list(path)
    if path.is_dir():
        with os.scandir(path) as entries:
            names = [e.name for e in entries if not e.name.startswith(".")]
        tars = sorted(n for n in names if n.lower().endswith(".tar"))
        if tars and len(tars) == len(names):
            return scan_tar_shards([str(path / n) for n in tars], spec)
    if path.is_file():
        raise DataError(
            f"data.root {spec} is a file that is neither a file list ({', '.join(sorted(LIST_SUFFIXES))}) "
            "nor a .tar shard; give a folder, a file list or tar shards"
        )
    return scan_image_folder(spec)


def expand_braces(pattern: str) -> list[str]:
    """`a-{00..02}.tar` -> [a-00.tar, a-01.tar, a-02.tar] (webdataset's shard notation)."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    if int(lo) > int(hi):
        raise DataError(f"shard pattern {pattern}: {{{lo}..{hi}}} counts down")
    width = len(lo)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    out = []
    for k in range(int(lo), int(hi) + 1):
        out.extend(expand_braces(f"{head}{k:0{width}d}{tail}"))
    return out


def read_file_list(path: str | os.PathLike) -> ImageList:
    path = Path(path)
    base = path.parent
    entries: list[tuple[str, str | None]] = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read the file list {path}: {err}") from None
    for lineno, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [f for f in re.split(r"[,\s]+", line) if f]
        if len(fields) > 2:
            raise DataError(f"{path}:{lineno}: expected 'path' or 'path label', got {line!r}")
        file = fields[0] if os.path.isabs(fields[0]) else str(base / fields[0])
        entries.append((file, fields[1] if len(fields) == 2 else None))
    if not entries:
        raise DataError(f"the file list {path} names no images")
    missing = [f for f, _ in entries if not os.path.isfile(f)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"the file list {path} names {len(missing)} missing file(s): {shown}")
    labels = [label for _, label in entries]
    if all(label is None for label in labels):
        return ImageList(str(path), [(f, UNLABELED) for f, _ in entries])
    if any(label is None for label in labels):
        raise DataError(f"the file list {path} gives labels for some images and not others")
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        bad = next((label for label in labels if not 0 <= int(label) <= MAX_LABEL), None)
        if bad is not None:
            raise DataError(f"the file list {path} has the label {bad[:40]}; integer labels run from 0 to {MAX_LABEL}")
        return ImageList(str(path), [(f, int(label)) for f, label in entries])
    classes = sorted(set(labels))
    index = {name: i for i, name in enumerate(classes)}
    return ImageList(str(path), [(f, index[label]) for f, label in entries], classes)


#: Integer class labels fit an int32 (every label tensor and FFCV's label field hold them).
MAX_LABEL = 2**31 - 1


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: key = path up to the first dot of the basename."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


def scan_tar_shards(shards: list[str], spec: str) -> ImageList:
    samples: list[tuple[str, int]] = []
    spans: list[tuple[int, int]] = []
    members: list[str] = []
    for shard in shards:
        if not os.path.isfile(shard):
            raise DataError(f"tar shard {shard} does not exist (from data.root {spec})")
        try:
            with tarfile.open(shard, "r:") as tar:
                found = _index_tar(tar)
        except (tarfile.TarError, OSError) as err:
            raise DataError(f"cannot read tar shard {shard}: {err}") from None
        for member, offset, size, label in found:
            samples.append((shard, label))
            spans.append((offset, size))
            members.append(member)
    if not samples:
        raise DataError(
            f"no images found in the tar shard(s) {spec}: expected members like key.jpg (and key.cls for labels)"
        )
    return ImageList(spec, samples, spans=spans, members=members)


def _index_tar(tar: tarfile.TarFile) -> list[tuple[str, int, int, int]]:
    """(member name, data offset, size, label) of each image in one uncompressed shard."""
    images: dict[str, tuple[str, int, int]] = {}
    labels: dict[str, int] = {}
    for info in tar:
        if not info.isfile():
            continue
        key, ext = _split_key(info.name)
        if ext in TAR_IMAGE_EXTENSIONS and key not in images:
            images[key] = (info.name, info.offset_data, info.size)
        elif ext == "cls":
            text = tar.extractfile(info).read().decode("utf-8", "replace").strip()
            if not re.fullmatch(r"\d{1,10}", text) or int(text) > MAX_LABEL:
                raise DataError(f"{tar.name}:{info.name} should hold a class label from 0 to {MAX_LABEL}, "
                                f"holds {text[:40]!r}")
            labels[key] = int(text)
    return [(name, offset, size, labels.get(key, UNLABELED)) for key, (name, offset, size) in images.items()]


__all__ = ["IMAGE_EXTENSIONS", "BetonFile", "expand_braces", "open_beton", "open_images", "read_file_list", "scan_tar_shards"]
