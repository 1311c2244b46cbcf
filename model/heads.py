"""Projection heads shared by the methods."""

from __future__ import annotations

from torch import nn


class MLPBNProjector(nn.Sequential):
    """3-layer MLP-BN projector (IE-CL paper, Section 4.1: hidden 4096, out 512).

    Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear -> BN (no affine),
    the MoCo-v3 / SimSiam layout: biases are dropped before each BatchNorm.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 512) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
            nn.BatchNorm1d(out_dim, affine=False),
        )
        self.out_dim = out_dim
