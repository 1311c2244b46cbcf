"""The reference loader: PIL decode and augmentation in DataLoader workers.

Plain and obviously correct, it is what the fast backends are checked and
benchmarked against. Views leave the workers as uint8 NHWC arrays (a quarter
of float32's bytes through shared memory, pinning and the host-to-device
copy); normalisation happens on the device.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from iecl.pipeline.augment import ViewRecipe, apply_view
from iecl.pipeline.bad_files import BadFileLog
from iecl.pipeline.decode import DECODE_ERRORS, decode_rgb, describe
from iecl.pipeline.draws import draw_two_views
from iecl.pipeline.errors import DataError
from iecl.pipeline.folder import ImageList
from iecl.pipeline.lifetime import die_with_parent
from iecl.pipeline.spec import BatchPlan
from iecl.pipeline.views import ViewBatch


class TwoViewDataset(Dataset):
    """Item (epoch, index) -> (anchor uint8 HWC, query uint8 HWC, label, skipped).

    An image that cannot be read or decoded is replaced by the next readable one
    (index + 1, + 2, ... : deterministic, so resumes and reruns agree); `skipped`
    lists (relative name, reason) of what was replaced, so that the loader can
    count it and the run report it. Nothing is dropped silently and the batch
    stays full (SAIB needs that). The view parameters come from the per-sample
    reference draws (`draws.draw_views_reference`), which the fast backends'
    vectorised draws equal number for number.
    """

    def __init__(self, images: ImageList, recipes: tuple[ViewRecipe, ViewRecipe], image_size: int, seed: int) -> None:
        self.images, self.recipes = images, recipes
        self.image_size, self.seed = image_size, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        skipped: list[tuple[str, str]] = []
        n = len(self.images)
        for k in range(n):
            i = (index + k) % n
            try:
                img = decode_rgb(self.images.read(i))
            except DECODE_ERRORS as err:
                skipped.append((self.images.relative_name(i), describe(err)))
                continue
            # The replacement keeps the requested sample's draws (drawn for its own size).
            draws = draw_two_views(self.recipes, self.seed, epoch, [index], [img.width], [img.height],
                                   self.image_size, reference=True)
            anchor, query = (apply_view(img, d.params(0), self.image_size) for d in draws)
            return anchor, query, self.images.samples[i][1], skipped
        raise DataError(f"none of the {n} images of {self.images.root} can be read, e.g. "
                        f"{skipped[0][0]} ({skipped[0][1]})")


def collate_views(items: list):
    anchors, queries, labels, skipped = zip(*items)
    return (
        torch.from_numpy(np.stack(anchors)),
        torch.from_numpy(np.stack(queries)),
        torch.tensor(labels, dtype=torch.int64),
        [name for names in skipped for name in names],
    )


def _init_worker(parent: int, worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the whole process group; the training process
    stops at a step boundary and shuts the workers down itself, so they must not
    die first (its next fetch would fail with "worker exited unexpectedly").
    A SIGKILLed trainer shuts nothing down: the kernel then kills the worker at
    once (PyTorch's own parent check would take seconds)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)


def worker_loader(dataset, batch_sampler, workers: int, collate, device: torch.device) -> DataLoader:
    """A DataLoader over `dataset` in `workers` processes, as every PIL-based
    loader here uses it: pinned memory for a GPU, persistent workers (an epoch
    travels in each sample's key, so they stay correct across epochs and skip a
    restart per epoch), and workers that ignore Ctrl-C (the training loop stops
    at a step boundary and must still fetch)."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=functools.partial(_init_worker, os.getpid()) if workers > 0 else None,
    )


class ReferenceLoader:
    """Backend `pil`: iterate -> `ViewBatch` on `device`; `len()` batches per epoch."""

    def __init__(self, images: ImageList, plan: BatchPlan) -> None:
        self.device, self.batch_size, workers = plan.device, plan.batch_size, plan.workers
        self._bad = BadFileLog(images)  # each unreadable file once, however many epochs meet it
        self.sampler = plan.sampler(len(images))
        self.loader = worker_loader(TwoViewDataset(images, plan.recipes, plan.image_size, plan.seed), self.sampler,
                                    workers, collate_views, self.device)

    @property
    def bad_files(self) -> list[str]:
        """"name (reason)" of each unreadable image met and replaced, once each."""
        return self._bad.names

    def __len__(self) -> int:
        return len(self.sampler)

    def close(self) -> None:
        """Stop the worker processes now rather than at garbage collection."""
        self.loader = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[ViewBatch]:
        for *tensors, skipped in self.loader:
            for name, reason in skipped:
                self._bad.add(name, reason)
            anchor, query, label = (t.to(self.device, non_blocking=True) for t in tensors)
            yield ViewBatch(anchor, query, label)
