"""Projection heads shared by the methods."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Layer:
    """One Linear layer of a head and what follows it: `norm` "bn" (BatchNorm
    with affine parameters), "bn-plain" (BatchNorm without) or None; a ReLU
    or not. `bias` defaults to "only where no BatchNorm follows" (a bias
    before BatchNorm is cancelled by its centring)."""

    width: int
    norm: str | None = None
    relu: bool = False
    bias: bool | None = None


class MLP(nn.Sequential):
    """The one head builder: Linear layers as `layers` say, flattened into one
    Sequential (so every head's state_dict keys are its layers' indices)."""

    def __init__(self, in_dim: int, layers: list[Layer]) -> None:
        modules: list[nn.Module] = []
        for layer in layers:
            bias = layer.norm is None if layer.bias is None else layer.bias
            modules.append(nn.Linear(in_dim, layer.width, bias=bias))
            if layer.norm is not None:
                modules.append(nn.BatchNorm1d(layer.width, affine=layer.norm == "bn"))
            if layer.relu:
                modules.append(nn.ReLU(inplace=True))
            in_dim = layer.width
        super().__init__(*modules)
        self.out_dim = in_dim


class MLPBNProjector(MLP):
    """3-layer MLP-BN projector (IE-CL paper, Section 4.1: hidden 4096, out 512).

    Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear -> BN (no affine),
    the MoCo-v3 / SimSiam layout: biases are dropped before each BatchNorm.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 512) -> None:
        super().__init__(in_dim, [Layer(hidden_dim, "bn", relu=True), Layer(hidden_dim, "bn", relu=True),
                                  Layer(out_dim, "bn-plain")])


class MoCoV2Head(MLP):
    """MoCo v2's 2-layer MLP head (Chen et al. 2020, "Improved Baselines", Section 2:
    hidden 2048 with ReLU, out 128): Linear -> ReLU -> Linear, both with bias, no BN."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__(in_dim, [Layer(hidden_dim, relu=True), Layer(out_dim)])


class SimCLRProjector(MLP):
    """SimCLR v1's 2-layer projection head g(.) with BN (Chen et al. 2020, Section 2.1;
    the BN layout of its reference code): Linear -> BN -> ReLU -> Linear -> BN.
    Biases are dropped before each BatchNorm. The reference code's last BN keeps a
    per-dimension scale (no centring); here it has no affine parameters at all."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__(in_dim, [Layer(hidden_dim, "bn", relu=True), Layer(out_dim, "bn-plain")])


class BYOLMLP(MLP):
    """BYOL's projector and predictor MLP (Grill et al. 2020, Section 3.3: hidden 4096,
    out 256): Linear -> BN -> ReLU -> Linear; no BN on the output (its code keeps
    the first Linear's bias before the BN)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(in_dim, [Layer(hidden_dim, "bn", relu=True, bias=True), Layer(out_dim)])


class SimSiamPredictor(MLP):
    """SimSiam's bottleneck predictor h (Chen & He 2021, Section 4.1 and its reference
    code: 2048 -> 512 -> 2048): Linear (no bias) -> BN -> ReLU -> Linear (with bias);
    no BN on the output. SimSiam's projector is `MLPBNProjector`'s layout."""

    def __init__(self, dim: int = 2048, hidden_dim: int = 512) -> None:
        super().__init__(dim, [Layer(hidden_dim, "bn", relu=True), Layer(dim)])


class Critic(nn.Module):
    """The post-training MI critic (`iecl mi`, train/eval/mi.py): a projection
    head, Linear-BN-ReLU-Linear (SimCLR's), and a learned temperature:
    score(x, y) = cos(g(x), g(y)) / tau.

    The temperature is learned (log-parametrised, kept in [0.01, 1]) because
    the tightest bound needs it: near-identical pairs want a small tau (a wide
    gap between positive and negative scores), uninformative ones a large one.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, tau: float = 0.1) -> None:
        super().__init__()
        self.head = MLP(in_dim, [Layer(hidden_dim, "bn", relu=True), Layer(out_dim)])
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / tau)))

    @property
    def scale(self) -> torch.Tensor:
        """1 / tau."""
        return self.log_scale.clamp(0.0, math.log(100.0)).exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(x), dim=1)
