"""Epoch order: which samples each rank sees, in which batches.

The order of epoch `e` is a permutation drawn from (seed, e) alone, so it can
be recomputed anywhere (another worker, another rank, a resumed run). Every
epoch yields the same number of full batches: the tail that does not fill a
batch on every rank is dropped (SAIB's weights are sized by the batch), and it
is a different tail each epoch. With `world_size` ranks, the kept part of the
permutation is dealt round-robin, so ranks are disjoint and equally long.
`set_epoch(e, start_batch=k)` skips the first k batches without loading them:
that is how a resumed run continues from the next batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from iecl.pipeline.errors import DataError


class EpochBatchSampler:
    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.batches = num_samples // (batch_size * world_size)
        if self.batches == 0:
            raise DataError(
                f"the dataset has {num_samples} images, fewer than one batch of {batch_size}"
                + (f" on each of {world_size} ranks" if world_size > 1 else "")
                + "; lower train.batch_size or add images"
            )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches:
            raise ValueError(f"start batch {start_batch} is outside an epoch of {self.batches} batches")
        self.epoch, self.start_batch = epoch, start_batch

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, in order, (batches * batch_size,)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        kept = order[: self.batches * self.batch_size * self.world_size]
        return kept[self.rank :: self.world_size]

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Batches of (epoch, sample index) keys: the epoch travels with each key so
        that dataset workers (persistent or not) seed augmentations correctly."""
        order = self.indices(self.epoch)
        for b in range(self.start_batch, self.batches):
            yield [(self.epoch, int(i)) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]
