"""The contract between a loader backend and the training step."""

from __future__ import annotations

from typing import NamedTuple

import torch

#: ImageNet statistics, in the 0-255 range of uint8 views.
MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class ViewBatch(NamedTuple):
    """One step's data, on the training device.

    anchor, query: uint8 (B, H, W, 3), the two augmented views of the same B images.
    label: int64 (B,), the class index, or -1 for unlabeled folders.
    """

    anchor: torch.Tensor
    query: torch.Tensor
    label: torch.Tensor
