"""Losses run in float32 even inside the training step's autocast region."""

from __future__ import annotations

import functools

import torch


def float32_forward(forward):
    """Wrap a loss's `forward(self, *embeddings)`: autocast off, inputs cast to float32.

    Casting the inputs alone is not enough: under autocast the matmuls inside a
    loss (similarities, Gram matrices) would still run in bf16/fp16, and a
    log-determinant of a bf16-accurate Gram matrix is not worth its gradient.
    """

    @functools.wraps(forward)
    def wrapper(self, *embeddings: torch.Tensor) -> torch.Tensor:
        with torch.autocast(embeddings[0].device.type, enabled=False):
            return forward(self, *(z.float() for z in embeddings))

    return wrapper
