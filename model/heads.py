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


class MoCoV2Head(nn.Sequential):
    """MoCo v2's 2-layer MLP head (Chen et al. 2020, "Improved Baselines", Section 2:
    hidden 2048 with ReLU, out 128): Linear -> ReLU -> Linear, both with bias, no BN."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.out_dim = out_dim


class SimCLRProjector(nn.Sequential):
    """SimCLR v1's 2-layer projection head g(.) with BN (Chen et al. 2020, Section 2.1;
    the BN layout of its reference code): Linear -> BN -> ReLU -> Linear -> BN.
    Biases are dropped before each BatchNorm. The reference code's last BN keeps a
    per-dimension scale (no centring); here it has no affine parameters at all."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
            nn.BatchNorm1d(out_dim, affine=False),
        )
        self.out_dim = out_dim


class BYOLMLP(nn.Sequential):
    """BYOL's projector and predictor MLP (Grill et al. 2020, Section 3.3: hidden 4096,
    out 256): Linear -> BN -> ReLU -> Linear; no BN on the output."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.out_dim = out_dim


class SimSiamPredictor(nn.Sequential):
    """SimSiam's bottleneck predictor h (Chen & He 2021, Section 4.1 and its reference
    code: 2048 -> 512 -> 2048): Linear (no bias) -> BN -> ReLU -> Linear (with bias);
    no BN on the output. SimSiam's projector is `MLPBNProjector`'s layout."""

    def __init__(self, dim: int = 2048, hidden_dim: int = 512) -> None:
        super().__init__(
            nn.Linear(dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, dim),
        )
        self.out_dim = dim
