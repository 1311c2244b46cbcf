"""Losses, one per file (lightly's layout): each an nn.Module whose docstring
names the equation it implements. All of them compute in float32, autocast or
not (`precision.float32_forward`)."""

from model.losses.entropy import (
    ENTROPY_ESTIMATORS,
    CodingRateEntropy,
    Renyi2Entropy,
    build_entropy,
)
from model.losses.infonce import InfoNCE
from model.losses.kl import GaussianKL

__all__ = [
    "ENTROPY_ESTIMATORS",
    "CodingRateEntropy",
    "GaussianKL",
    "InfoNCE",
    "Renyi2Entropy",
    "build_entropy",
]
