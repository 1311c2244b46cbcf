"""The image index: every image's upright size and whether it is readable,
decided once per file and cached, so no loader parses a header in its hot path.

Readable means what `decode.inspect_image` says (a full PIL decode, a format
every backend reads; the size after the EXIF orientation): the decision
`iecl validate` and the PIL loader make, so DALI never trains on a file they
reject (issue 18: a JPEG with a corrupt body used to pass DALI's header check).
Building it decodes every image once, in a pool of processes with a progress
bar; the result is cached under `cache_dir` keyed by the list of images, and
each file's entry is reused while its size and modification time are unchanged
(tar members: the shard's). Processes building the same index at once (the
ranks of one machine) take turns through a lock file, so only the first decodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iecl.pipeline.decode import DECODE_ERRORS, describe, inspect_image
from iecl.pipeline.errors import DataError
from iecl.pipeline.folder import ImageList
from iecl.pipeline.lifetime import die_with_parent
from iecl.pipeline.spec import DEFAULT_INDEX_CACHE

DEFAULT_CACHE = DEFAULT_INDEX_CACHE  # unless the caller says otherwise (DaliOptions.index_cache)
_VERSION = 1  # bump when the decision or the file layout changes


@dataclass
class ImageIndex:
    sizes: np.ndarray  # int64 (N, 2): width, height as decoded and turned upright; 0 where unreadable
    reasons: dict[int, str]  # image -> why it is unreadable

    def __len__(self) -> int:
        return len(self.sizes)

    def replacements(self) -> np.ndarray:
        """int64 (N,): for each image, the first readable one at or after it
        (cyclically): what the loaders deliver in its place."""
        n = len(self.sizes)
        good = np.ones(n, bool)
        good[list(self.reasons)] = False
        positions = np.flatnonzero(good)
        if not len(positions):
            first = next(iter(self.reasons.items()))
            raise DataError(f"none of the {n} images can be read, e.g. image {first[0]} ({first[1]}); "
                            "run `iecl validate DATA_DIR`")
        after = np.searchsorted(positions, np.arange(n))  # first readable position >= i, or len (wrap)
        return positions[after % len(positions)]


def _inspect_rows(images: ImageList, rows: np.ndarray) -> list[tuple[int, int, int, str | None]]:
    out = []
    for i in rows:
        try:
            width, height = inspect_image(images.read(int(i)))
            out.append((int(i), width, height, None))
        except DECODE_ERRORS as err:
            out.append((int(i), 0, 0, describe(err)))
    return out


_IMAGES: ImageList | None = None  # the pool workers' copy, set once by the initializer


def _init_worker(images: ImageList, parent: int) -> None:
    global _IMAGES
    _IMAGES = images
    die_with_parent(parent)


def _inspect_chunk(rows: np.ndarray) -> list[tuple[int, int, int, str | None]]:
    return _inspect_rows(_IMAGES, rows)


def inspect_images(images: ImageList, rows: np.ndarray, *, workers: int = 1, progress: bool = True,
                   chunk: int = 64, desc: str = "indexing") -> list[tuple[int, int, int, str | None]]:
    """(row, width, height, reason or None) of each image in `rows`, decoded in `workers` processes."""
    from tqdm import tqdm

    chunks = [rows[lo : lo + chunk] for lo in range(0, len(rows), chunk)]
    found: list[tuple[int, int, int, str | None]] = []
    with tqdm(total=len(rows), desc=desc, unit="img", disable=not progress) as bar:
        if workers <= 1 or len(chunks) <= 1:
            results = (_inspect_rows(images, rows) for rows in chunks)
            pool = contextlib.nullcontext()
        else:
            pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(images, os.getpid()))
            results = pool.map(_inspect_chunk, chunks)
        bad = 0
        with pool:
            for part in results:
                found.extend(part)
                bad += sum(r[3] is not None for r in part)
                bar.update(len(part))
                bar.set_postfix(bad=bad, refresh=False)
    return found


def _stats(images: ImageList) -> np.ndarray:
    """int64 (N, 2): (size, mtime_ns) of each image's file (a tar member: its shard's); -1 if gone."""
    cached: dict[str, tuple[int, int]] = {}
    out = np.empty((len(images), 2), np.int64)
    for i, (path, _) in enumerate(images.samples):
        stat = cached.get(path)
        if stat is None:
            try:
                st = os.stat(path)
                stat = (st.st_size, st.st_mtime_ns)
            except OSError:
                stat = (-1, -1)
            if images.spans is not None:
                cached[path] = stat
        out[i] = stat
    return out


def _key(images: ImageList) -> str:
    digest = hashlib.sha256(f"v{_VERSION}\0{os.path.abspath(images.root)}\0".encode())
    for i in range(len(images)):
        digest.update(images.name(i).encode("utf-8", "surrogateescape") + b"\0")
    if images.spans is not None:
        digest.update(np.asarray(images.spans, np.int64).tobytes())
    return digest.hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _load(path: Path, n: int) -> dict | None:
    try:
        with np.load(path) as f:
            data = {k: f[k] for k in ("stats", "sizes", "bad_rows")}
            data["bad_reasons"] = json.loads(str(f["bad_reasons"]))
    except (OSError, ValueError, KeyError):
        return None
    return data if len(data["sizes"]) == n else None


def _save(path: Path, stats: np.ndarray, index: ImageIndex) -> None:
    rows = np.array(sorted(index.reasons), np.int64)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, stats=stats, sizes=index.sizes, bad_rows=rows,
                     bad_reasons=np.array(json.dumps([index.reasons[int(r)] for r in rows])))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def image_index(images: ImageList, *, workers: int = 1, progress: bool = True,
                cache_dir: str | os.PathLike | None = DEFAULT_CACHE) -> ImageIndex:
    """The index of `images`: cached files reused, new or changed ones decoded
    (`cache_dir=None`: no cache, everything decoded)."""
    if cache_dir is None:
        return _build(images, _stats(images), None, workers, progress)
    folder = Path(cache_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_key(images)}.npz"
        with _locked(folder / f"{path.stem}.lock"):
            stats = _stats(images)
            index = _build(images, stats, _load(path, len(images)), workers, progress)
            _save(path, stats, index)
        return index
    except OSError as err:
        warnings.warn(f"cannot keep the image index in {folder} ({err}); indexing without a cache", stacklevel=2)
        return _build(images, _stats(images), None, workers, progress)


def _build(images: ImageList, stats: np.ndarray, cached: dict | None, workers: int, progress: bool) -> ImageIndex:
    n = len(images)
    sizes = np.zeros((n, 2), np.int64)
    reasons: dict[int, str] = {}
    todo = np.arange(n)
    if cached is not None:
        same = (cached["stats"] == stats).all(1) & (stats[:, 0] >= 0)
        sizes[same] = cached["sizes"][same]
        for row, reason in zip(cached["bad_rows"].tolist(), cached["bad_reasons"]):
            if same[row]:
                reasons[row] = reason
        todo = np.flatnonzero(~same)
    for row, width, height, reason in inspect_images(images, todo, workers=workers, progress=progress and len(todo)):
        sizes[row] = (width, height)
        if reason is not None:
            reasons[row] = reason
    return ImageIndex(sizes, reasons)
