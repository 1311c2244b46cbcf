"""Labelled single-view loading for evaluation (kNN monitor, `iecl knn`, `iecl lineval`).

Two transforms, both on PIL images with bilinear resampling (torchvision's
default for `Resize` and `RandomResizedCrop`, which the MoCo / SimCLR
evaluation code uses):

- test (`train_augment=False`): resize the shorter side to
  round(image_size * 256 / 224), then take the central image_size square
  (ImageNet's 256 -> 224 protocol, scaled to any crop size). Order fixed.
- train (`train_augment=True`, the linear probe's training set in MoCo's
  protocol): RandomResizedCrop(image_size, scale (0.08, 1), ratio (3/4, 4/3))
  and a horizontal flip with probability 1/2. Each sample's randomness comes
  from (seed, epoch, index) alone and the order is a (seed, epoch)
  permutation, so reruns agree whatever the worker count.

Images leave the workers as uint8 NHWC (a quarter of float32's bytes through
shared memory and the host-to-device copy) and are normalised on the device.
Evaluation must see every image exactly once: the last batch may be partial,
and an unreadable image is skipped (named in `bad_files`), not replaced by
another one as in training, where the batch must stay full.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from iecl.pipeline.augment import sample_crop
from iecl.pipeline.bad_files import BadFileLog
from iecl.pipeline.decode import DECODE_ERRORS, decode_rgb, describe
from iecl.pipeline.errors import DataError
from iecl.pipeline.folder import ImageList
from iecl.pipeline.reference import worker_loader
from iecl.pipeline.views import MEAN_255, STD_255, normalize

#: Random-resized-crop area range of the linear probe's training views (MoCo's protocol).
TRAIN_CROP_SCALE = (0.08, 1.0)
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)


def resize_size(image_size: int) -> int:
    """Shorter side before the centre crop: 256 for a 224 crop, the same ratio for others."""
    return round(image_size * 256 / 224)


def center_view(img: Image.Image, image_size: int) -> np.ndarray:
    """Resize the shorter side, centre-crop: uint8 (image_size, image_size, 3).

    Sizes and offsets follow torchvision's Resize(int) (the longer side is
    truncated, not rounded) and CenterCrop (offsets rounded)."""
    width, height = img.size
    short = resize_size(image_size)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    img = img.resize((new_w, new_h), Image.BILINEAR)
    left = round((new_w - image_size) / 2)
    top = round((new_h - image_size) / 2)
    img = img.crop((left, top, left + image_size, top + image_size))
    return np.asarray(img, dtype=np.uint8)


def augmented_view(img: Image.Image, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """RandomResizedCrop + horizontal flip: uint8 (image_size, image_size, 3)."""
    width, height = img.size
    left, top, w, h = sample_crop(rng, width, height, TRAIN_CROP_SCALE, TRAIN_CROP_RATIO)
    view = img.resize((image_size, image_size), Image.BILINEAR, box=(left, top, left + w, top + h))
    if rng.uniform() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(view, dtype=np.uint8)


def view_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Sample `index`'s generator in `epoch`: independent of worker and batch."""
    return np.random.default_rng([seed, epoch, index])


class EvalDataset(Dataset):
    """Item (epoch, index) -> (uint8 HWC view or None if unreadable, label,
    None or (name relative to the data root, reason))."""

    def __init__(self, images: ImageList, image_size: int, train_augment: bool, seed: int) -> None:
        self.images, self.image_size = images, image_size
        self.train_augment, self.seed = train_augment, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        label = self.images.samples[index][1]
        try:
            img = decode_rgb(self.images.read(index))
        except DECODE_ERRORS as err:
            return None, label, (self.images.relative_name(index), describe(err))
        if self.train_augment:
            view = augmented_view(img, self.image_size, view_rng(self.seed, epoch, index))
        else:
            view = center_view(img, self.image_size)
        return view, label, None


def collate_eval(items: list):
    """-> (uint8 (B, H, W, 3) or None when every image failed, int64 labels (B,), (name, reason) of each skipped image)."""
    kept = [(view, label) for view, label, _ in items if view is not None]
    skipped = [reason for _, _, reason in items if reason is not None]
    if not kept:
        return None, torch.empty(0, dtype=torch.int64), skipped
    views, labels = zip(*kept)
    return torch.from_numpy(np.stack(views)), torch.tensor(labels, dtype=torch.int64), skipped


class EvalBatchSampler:
    """Batches of (epoch, index) keys covering this rank's share once, last batch partial.

    Ranks take the (shuffled or fixed) order round-robin, so their shares are
    disjoint and together cover every image; their lengths differ by at most
    one image (a caller gathering across ranks must allow for that)."""

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_samples, self.batch_size, self.shuffle, self.seed = num_samples, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def indices(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        share = len(range(self.rank, self.num_samples, self.world_size))
        return math.ceil(share / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.indices(self.epoch)
        for start in range(0, len(order), self.batch_size):
            yield [(self.epoch, int(i)) for i in order[start : start + self.batch_size]]


class EvalLoader:
    """Iterate -> (images float32 (B, 3, H, W) normalised, channels-last, labels int64 (B,)) on `device`.

    `len()` is the number of batches per epoch. `set_epoch(e)` picks the
    order and augmentations of epoch e (only `train_augment` depends on it).
    `bad_files` lists each unreadable image once ("name (reason)"), however
    many epochs met it. `workers=0` decodes in this process.
    """

    def __init__(
        self,
        images: ImageList,
        *,
        batch_size: int,
        image_size: int,
        workers: int,
        device: torch.device | str,
        train_augment: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.device = torch.device(device)
        self.images = images
        self._bad = BadFileLog(images)  # each unreadable file once, however many epochs meet it
        self.sampler = EvalBatchSampler(len(images), batch_size, train_augment, seed, rank, world_size)
        self.mean = torch.tensor(MEAN_255, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(STD_255, dtype=torch.float32, device=self.device)
        self.loader = worker_loader(EvalDataset(images, image_size, train_augment, seed), self.sampler, workers,
                                    collate_eval, self.device)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def bad_files(self) -> list[str]:
        """Each unreadable image once, "name (reason)", the name relative to the data root."""
        return self._bad.names

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """The image indices of `epoch` (default: the current one) in the order they come."""
        return self.sampler.indices(self.sampler.epoch if epoch is None else epoch)

    def close(self) -> None:
        """Stop the worker processes now rather than at garbage collection."""
        self.loader = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.loader is None:
            raise RuntimeError("EvalLoader is closed")
        yielded = 0
        for views, labels, skipped in self.loader:
            for name, reason in skipped:
                self._bad.add(name, reason)
            if views is None:
                continue
            views = views.to(self.device, non_blocking=True)
            yielded += len(labels)
            yield (
                normalize(views, self.mean, self.std, torch.float32),
                labels.to(self.device, non_blocking=True),
            )
        if yielded == 0 and self.bad_files:
            raise DataError(f"none of the images of {self.images.root} can be read, e.g. {self.bad_files[0]}")
