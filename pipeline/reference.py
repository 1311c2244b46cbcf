"""The reference loader: PIL decode and augmentation in DataLoader workers.

Plain and obviously correct, it is what the fast backends are checked and
benchmarked against. Views leave the workers as uint8 NHWC arrays (a quarter
of float32's bytes through shared memory, pinning and the host-to-device
copy); normalisation happens on the device.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.augment import ViewRecipe, two_views
from pipeline.errors import DataError
from pipeline.folder import ImageList
from pipeline.sampler import EpochBatchSampler
from pipeline.views import ViewBatch

# What PIL raises for files it cannot decode: unknown format, truncated data,
# decompression bombs, corrupt headers.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class Unreadable(NamedTuple):
    path: str
    reason: str


class TwoViewDataset(Dataset):
    """Item (epoch, index) -> (anchor uint8 HWC, query uint8 HWC, label), or `Unreadable`."""

    def __init__(self, images: ImageList, recipes: tuple[ViewRecipe, ViewRecipe], image_size: int, seed: int) -> None:
        self.samples, self.recipes = images.samples, recipes
        self.image_size, self.seed = image_size, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        path, label = self.samples[index]
        rngs = tuple(np.random.default_rng([self.seed, epoch, index, view]) for view in range(2))
        try:
            anchor, query = two_views(path, self.recipes, self.image_size, rngs)
        except DECODE_ERRORS as err:
            return Unreadable(path, f"{type(err).__name__}: {err}")
        return anchor, query, label


def collate_views(items: list):
    """Stack a batch, or pass on the list of unreadable files if there are any
    (the main process turns that into one clear error, not a worker traceback)."""
    bad = [item for item in items if isinstance(item, Unreadable)]
    if bad:
        return bad
    anchors, queries, labels = zip(*items)
    return (
        torch.from_numpy(np.stack(anchors)),
        torch.from_numpy(np.stack(queries)),
        torch.tensor(labels, dtype=torch.int64),
    )


def _ignore_sigint(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the whole process group; the training process
    stops at a step boundary and shuts the workers down itself, so they must not
    die first (its next fetch would fail with "worker exited unexpectedly")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ReferenceLoader:
    """Backend `pil`: iterate -> `ViewBatch` on `device`; `len()` batches per epoch."""

    def __init__(
        self,
        images: ImageList,
        *,
        recipes: tuple[ViewRecipe, ViewRecipe],
        batch_size: int,
        image_size: int,
        seed: int,
        workers: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.device = device
        self.batch_size = batch_size
        self.sampler = EpochBatchSampler(len(images), batch_size, seed, rank, world_size)
        self.loader = DataLoader(
            TwoViewDataset(images, recipes, image_size, seed),
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_views,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=_ignore_sigint if workers > 0 else None,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[ViewBatch]:
        for batch in self.loader:
            if isinstance(batch, list):
                files = "; ".join(f"{bad.path} ({bad.reason})" for bad in batch)
                raise DataError(f"cannot read {len(batch)} image(s): {files}; remove or replace them")
            anchor, query, label = (t.to(self.device, non_blocking=True) for t in batch)
            yield ViewBatch(anchor, query, label)
