"""Labelled train/validation images for evaluation (kNN, linear probe, MI).

`DIR` is either a folder with `train/` and `val/` (ImageNet's layout: each an
ImageNet-style class folder, the same class names in both), or one labelled
source (folder, file list, tar shards) split here: a fixed fraction of each
class, chosen by a seeded permutation, is held out. The split depends only on
(the sorted image list, val_fraction, seed), so every command and every rank
sees the same one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from iecl.pipeline import DataError, ImageList, open_images
from iecl.pipeline.folder import UNLABELED


@dataclasses.dataclass
class LabelledSplits:
    train: ImageList
    val: ImageList
    num_classes: int
    held_out: bool  # True when val was split off here (no val/ folder)


def labelled_splits(root: str | Path, val_fraction: float = 0.1, seed: int = 0) -> LabelledSplits:
    root = Path(str(root)).expanduser()
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = open_images(root / "train"), open_images(root / "val")
        _require_labels(train), _require_labels(val)
        if val.classes and train.classes != val.classes:
            missing = sorted(set(train.classes) ^ set(val.classes))[:5]
            raise DataError(f"{root}/train and {root}/val have different classes (e.g. {', '.join(missing)})")
        return LabelledSplits(train, val, _num_classes(train), held_out=False)
    images = open_images(root)
    _require_labels(images)
    train_idx, val_idx = _stratified_split(images, val_fraction, seed)
    return LabelledSplits(subset(images, train_idx), subset(images, val_idx), _num_classes(images), held_out=True)


def subset(images: ImageList, indices) -> ImageList:
    """The images at `indices`, in that order (labels and classes kept)."""
    indices = [int(i) for i in indices]
    spans = None if images.spans is None else [images.spans[i] for i in indices]
    members = None if images.members is None else [images.members[i] for i in indices]
    return ImageList(images.root, [images.samples[i] for i in indices], list(images.classes), spans, members)


def _num_classes(images: ImageList) -> int:
    return len(images.classes) if images.classes else max(label for _, label in images.samples) + 1


def _require_labels(images: ImageList) -> None:
    if any(label == UNLABELED for _, label in images.samples):
        raise DataError(
            f"{images.root} has unlabelled images; evaluation needs labels: an ImageNet-style folder "
            "root/<class>/<image>, a file list with labels, or tar shards with .cls files"
        )


def _stratified_split(images: ImageList, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    labels = np.array([label for _, label in images.samples])
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction))) if len(members) > 1 else 0
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    if not val:
        raise DataError(f"{images.root} is too small to hold out a validation set (every class has one image)")
    return sorted(train), sorted(val)
