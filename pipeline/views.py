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


def normalize(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """uint8 (B, H, W, C) -> `dtype` (B, C, H, W) channels-last, (x - mean) / std.

    `mean` and `std` are (C,) float32 in the 0-255 range of the input.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (B, H, W, C) views, got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float()  # (B, C, H, W), channels-last strides
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return x.to(dtype).contiguous(memory_format=torch.channels_last)
