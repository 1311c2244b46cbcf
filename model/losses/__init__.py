"""Losses, one per file (lightly's layout): each an nn.Module whose docstring
names the equation it implements. All of them compute in float32, autocast or
not (`precision.float32_forward`)."""

from iecl.model.losses.cosine import NegativeCosineSimilarity, NormalizedMSE
from iecl.model.losses.entropy import (
    ENTROPY_ESTIMATORS,
    CodingRateEntropy,
    Renyi2Entropy,
    build_entropy,
)
from iecl.model.losses.infonce import InfoNCE
from iecl.model.losses.kl import GaussianKL
from iecl.model.losses.ntxent import NTXent, nt_xent
from iecl.model.losses.queue_infonce import QueueInfoNCE

__all__ = [
    "ENTROPY_ESTIMATORS",
    "CodingRateEntropy",
    "GaussianKL",
    "InfoNCE",
    "NTXent",
    "NegativeCosineSimilarity",
    "NormalizedMSE",
    "QueueInfoNCE",
    "Renyi2Entropy",
    "build_entropy",
    "nt_xent",
]
