"""`iecl validate`: find the images a run would trip over, before the run.

Every image is decoded in full (a header check misses truncated JPEGs, the
commonest fault of interrupted copies), in a pool of processes, with a
progress bar. For folders, files that are not images at all are listed too:
training ignores them, but a user who expected them to be used wants to know.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from iecl.pipeline.decode import decode_error
from iecl.pipeline.folder import IMAGE_EXTENSIONS, ImageList
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


_IMAGES: ImageList | None = None  # the pool workers' copy, set once by the initializer


def _init_worker(images: ImageList) -> None:
    global _IMAGES
    _IMAGES = images


def _check_chunk(bounds: tuple[int, int]) -> list[tuple[int, str]]:
    bad = []
    for i in range(*bounds):
        try:
            reason = decode_error(_IMAGES.read(i))
        except OSError as err:
            reason = f"cannot read: {err}"
        if reason is not None:
            bad.append((i, reason))
    return bad


def validate_images(
    images: ImageList, workers: int | None = None, progress: bool = True, chunk: int = 64
) -> ValidationReport:
    """Decode every image of `images` (`open_images` of a data.root spec)."""
    from tqdm import tqdm

    report = ValidationReport(images.root, checked=len(images) + len(images.bad_entries))
    if os.path.isdir(images.root) and images.spans is None:
        report.non_images = non_image_files(images.root)
    workers = max(1, workers or os.cpu_count() or 1)
    chunks = [(lo, min(lo + chunk, len(images))) for lo in range(0, len(images), chunk)]
    bad: list[tuple[int, str]] = []
    with tqdm(total=len(images), desc="validating", unit="img", disable=not progress) as bar:
        if workers == 1:
            _init_worker(images)
            results = map(_check_chunk, chunks)
            for (lo, hi), found in zip(chunks, results):
                bad.extend(found)
                bar.update(hi - lo)
        else:
            with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(images,)) as pool:
                for (lo, hi), found in zip(chunks, pool.map(_check_chunk, chunks)):
                    bad.extend(found)
                    bar.update(hi - lo)
                    bar.set_postfix(bad=len(bad), refresh=False)
    # Entries the folder walk could not even look at (symlink loops, unreadable folders) come first.
    entries = [(os.path.join(images.base, name), reason) for name, reason in images.bad_entries]
    report.unreadable = entries + [(images.name(i), reason) for i, reason in sorted(bad)]
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
