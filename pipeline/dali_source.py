"""What the DALI graph is fed, one call per batch: no Python per sample.

`BatchSource` is a batch-mode `fn.external_source` callback. For DALI's batch
`info.iteration` of its epoch `info.epoch_idx` it takes the batch's sample
indices from our `EpochBatchSampler` (so DALI, PIL and FFCV deliver the same
images in the same batches, on every rank, after any resume), replaces each
unreadable image by the next readable one (from the `ImageIndex`, decided once
per file), draws both views' parameters for the whole batch
(`draws.draw_two_views`, on the upright sizes of the index) and returns:

    data      the files' paths, uint8 (B, L) NUL-padded, for `fn.io.file.read`
              (DALI's threads read the files; no image bytes pass through
              Python), or, for tar-shard
              members, which DALI cannot address by path, the members' bytes
    label     int64 (B,)
    skipped   int32 (B,): unreadable images skipped for each slot, which the
              loader names in `bad_files` (from the index: no worker round trip)
    anchor    float32 (B, N_PARAMS): the anchor view's parameter vectors
    query     float32 (B, N_PARAMS)

The parameter vector layout (`P_*`) is what the graph in `pipeline/dali.py` reads.
"""

from __future__ import annotations

import math
import os

import numpy as np

from iecl.pipeline.augment import ViewParams
from iecl.pipeline.draws import ViewDraws, draw_two_views
from iecl.pipeline.folder import ImageList
from iecl.pipeline.index import ImageIndex
from iecl.pipeline.lifetime import die_with_parent
from iecl.pipeline.sampler import EpochBatchSampler

P_BOX = slice(0, 4)  # left, top, w, h: image_slice's anchor (x, y) and shape (w, h), "WH" order
P_ROI_START, P_ROI_END = slice(4, 6), slice(6, 8)  # resize's ROI in source pixels, (y, x); x swapped = flip
P_REL_START, P_REL_END = slice(8, 10), slice(10, 12)  # the same over a decoded window, relative
P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE = 12, 13, 14, 15
P_SIGMA, P_WINDOW, P_SOLARIZE = 16, 17, 18
N_PARAMS = 19


def view_vector(params: ViewParams) -> np.ndarray:
    """One view's `ViewParams` as the float32 vector the DALI graph reads (the
    per-sample reference of `view_vectors`)."""
    left, top, w, h = params.box
    right = left + w
    vec = np.zeros(N_PARAMS, np.float32)
    vec[P_BOX] = (left, top, w, h)
    # A flip is the resize reading its ROI right to left: it commutes with every
    # later step (pointwise colour operations, a symmetric blur), so it costs no pass.
    vec[P_ROI_START] = (top, right if params.flip else left)
    vec[P_ROI_END] = (top + h, left if params.flip else right)
    vec[P_REL_START] = (0.0, 1.0 if params.flip else 0.0)
    vec[P_REL_END] = (1.0, 0.0 if params.flip else 1.0)
    vec[P_BRIGHTNESS] = params.brightness
    vec[P_CONTRAST] = params.contrast
    # Grayscale after the jitter is saturation 0: the hue rotation and the
    # saturation change keep the luma (PIL's L weights), so nothing else matters.
    vec[P_SATURATION] = 0.0 if params.grayscale else params.saturation
    # In sextants (6 per turn); PIL shifts its 8-bit H channel by round(hue * 255).
    vec[P_HUE] = round(params.hue * 255) / 255 * 6
    if params.blur_sigma > 0:
        vec[P_SIGMA] = params.blur_sigma
        vec[P_WINDOW] = 2 * math.ceil(3 * params.blur_sigma) + 1
    else:  # a one-tap kernel: the identity
        vec[P_SIGMA], vec[P_WINDOW] = 1.0, 1
    vec[P_SOLARIZE] = 255.0 if params.solarize else 0.0  # XOR mask of the pixels >= 128
    return vec


def view_vectors(draws: ViewDraws) -> np.ndarray:
    """float32 (B, N_PARAMS): `view_vector` of every row of `draws`, at once."""
    left, top, w, h = draws.box.T.astype(np.float64)
    right, flip = left + w, draws.flip
    vec = np.empty((len(draws), N_PARAMS), np.float64)
    vec[:, P_BOX] = draws.box
    vec[:, 4], vec[:, 5] = top, np.where(flip, right, left)
    vec[:, 6], vec[:, 7] = top + h, np.where(flip, left, right)
    vec[:, 8], vec[:, 9], vec[:, 10], vec[:, 11] = 0.0, flip, 1.0, ~flip
    vec[:, P_BRIGHTNESS], vec[:, P_CONTRAST] = draws.brightness, draws.contrast
    vec[:, P_SATURATION] = np.where(draws.grayscale, 0.0, draws.saturation)
    vec[:, P_HUE] = np.round(draws.hue * 255) / 255 * 6
    blurred = draws.blur_sigma > 0
    vec[:, P_SIGMA] = np.where(blurred, draws.blur_sigma, 1.0)
    vec[:, P_WINDOW] = np.where(blurred, 2 * np.ceil(3 * draws.blur_sigma) + 1, 1)
    vec[:, P_SOLARIZE] = np.where(draws.solarize, 255.0, 0.0)
    return vec.astype(np.float32)


def encoded_paths(images: ImageList) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 buffer, int64 offsets (N + 1,)): every image's path as UTF-8, back
    to back, so a batch's paths are views into one array (no per-call encoding)."""
    encoded = [path.encode("utf-8", "surrogateescape") for path, _ in images.samples]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8), offsets


class BatchSource:
    """The batch-mode external-source callback (picklable: DALI's workers run it for tar shards).

    DALI epoch `epoch_idx` of this pipeline is our epoch `first_epoch + epoch_idx`;
    its first epoch starts at batch `start_batch`, later ones at 0.
    """

    def __init__(self, images: ImageList, index: ImageIndex, plan, sampler: EpochBatchSampler,
                 first_epoch: int, start_batch: int) -> None:
        self.images, self.recipes, self.image_size = images, plan.recipes, plan.image_size
        self.seed, self.sampler = plan.seed, sampler
        self.first_epoch, self.start_batch = first_epoch, start_batch
        self.by_path = images.spans is None  # files: DALI reads them; tar members: bytes from here
        self.sizes = index.sizes
        self.replacement = index.replacements()
        self.labels = np.array([label for _, label in images.samples], np.int64)
        self.paths, self.offsets = encoded_paths(images) if self.by_path else (None, None)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, indices), this process's cache

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pickled_by": os.getpid()}

    def __setstate__(self, state: dict) -> None:
        parent = state.pop("_pickled_by", None)
        self.__dict__.update(state)
        if parent is not None and parent != os.getpid():  # a spawned DALI worker: die with the trainer
            die_with_parent(parent)

    def indices(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.sampler.indices(epoch))
        return self._order[1]

    def batch(self, epoch: int, batch: int) -> tuple:
        """The outputs of batch `batch` of our epoch `epoch` (see the module docstring)."""
        size = self.sampler.batch_size
        index = self.indices(epoch)[batch * size : (batch + 1) * size]
        source = self.replacement[index]
        # A replacement keeps this slot's draws (so it is not a duplicate of the
        # replacement's own views), drawn for the replacement's size; its own label.
        width, height = self.sizes[source, 0], self.sizes[source, 1]
        anchor, query = draw_two_views(self.recipes, self.seed, epoch, index, width, height, self.image_size)
        if self.by_path:
            data = self.batch_paths(source)
        else:
            data = [np.frombuffer(self.images.read(s), np.uint8) for s in source.tolist()]
        skipped = ((source - index) % len(self.replacement)).astype(np.int32)
        return data, self.labels[source], skipped, view_vectors(anchor), view_vectors(query)

    def batch_paths(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (B, L): the paths of images `rows`, one per row, NUL-padded to
        the longest. One dense array, so DALI takes the batch without a
        per-sample Python loop (a list of B arrays costs ~7 us per sample in
        DALI's feeding code); `fn.io.file.read` opens each row as a C string,
        so the padding ends the path (a path cannot contain NUL)."""
        start, length = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        column = np.arange(int(length.max()))
        inside = column[None, :] < length[:, None]
        gather = np.where(inside, start[:, None] + column[None, :], 0)
        return np.where(inside, self.paths[gather], 0).astype(np.uint8)

    def __call__(self, info):
        epoch = self.first_epoch + info.epoch_idx
        batch = info.iteration + (self.start_batch if info.epoch_idx == 0 else 0)
        if batch >= self.sampler.batches:
            raise StopIteration
        return self.batch(epoch, batch)


__all__ = ["N_PARAMS", "BatchSource", "encoded_paths", "view_vector", "view_vectors"]
