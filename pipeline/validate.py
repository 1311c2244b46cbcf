"""`iecl validate`: find the images a run would trip over, before the run.

Every image is decoded in full (a header check misses truncated JPEGs, the
commonest fault of interrupted copies), in a pool of processes, with a
progress bar. For folders, files that are not images at all are listed too:
training ignores them, but a user who expected them to be used wants to know.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from iecl.pipeline.folder import IMAGE_EXTENSIONS, ImageList
from iecl.pipeline.index import inspect_images
from iecl.pipeline.synthetic import MANIFEST


@dataclass
class ValidationReport:
    source: str
    checked: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    non_images: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unreadable

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "checked": self.checked,
            "readable": self.checked - len(self.unreadable),
            "unreadable": [{"file": name, "reason": reason} for name, reason in self.unreadable],
            "non_image_files": self.non_images,
        }


def validate_images(
    images: ImageList, workers: int | None = None, progress: bool = True, chunk: int = 64
) -> ValidationReport:
    """Decode every image of `images` (`open_images` of a data.root spec): the
    readability decision of `decode.inspect_image`, which every loader shares."""
    report = ValidationReport(images.root, checked=len(images) + len(images.bad_entries))
    if os.path.isdir(images.root) and images.spans is None:
        report.non_images = non_image_files(images.root)
    workers = max(1, workers or os.cpu_count() or 1)
    found = inspect_images(images, np.arange(len(images)), workers=workers, progress=progress, chunk=chunk,
                           desc="validating")
    bad = sorted((row, reason) for row, _, _, reason in found if reason is not None)
    # Entries the folder walk could not even look at (symlink loops, unreadable folders) come first.
    entries = [(os.path.join(images.base, name), reason) for name, reason in images.bad_entries]
    report.unreadable = entries + [(images.name(i), reason) for i, reason in bad]
    return report


def non_image_files(root: str) -> list[str]:
    """Files under `root` (two levels: the ImageNet layout) without an image extension."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if os.path.relpath(dirpath, root).count(os.sep) >= 1:
            dirnames[:] = []
        for name in sorted(filenames):
            if name.startswith(".") or name == MANIFEST:
                continue
            path = os.path.join(dirpath, name)
            # (a symlink loop is a bad entry, reported with the unreadable images; a dangling link is nothing)
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS and os.path.exists(path):
                out.append(path)
    return out
