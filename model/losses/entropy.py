"""Entropy estimators for a batch of embeddings (IE-CL's -lambda * H(z_query)).

Both work on L2-normalised embeddings, in float32, and are differentiable.
See *Information Flow in Self-Supervised Learning* (Tan et al.) (total coding rate, matrix-based
Renyi entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iecl.model.losses.precision import float32_forward


class CodingRateEntropy(nn.Module):
    """Total coding rate: H(Z) = 1/2 logdet(I_d + d / (n eps^2) Z^T Z).

    Z is (n, d) with unit rows. By Sylvester's identity the determinant equals
    that of the n x n Gram form, so the smaller of the two is factorised
    (Cholesky: the matrix is symmetric positive definite by construction).
    Bounded below by 0 (collapse: rank 1) and grows as the batch spreads out.
    """

    def __init__(self, eps: float = 0.5) -> None:
        super().__init__()
        self.eps = eps

    @float32_forward
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = F.normalize(z, dim=1)
        n, d = z.shape
        gram = z.T @ z if d <= n else z @ z.T
        scale = d / (n * self.eps**2)
        eye = torch.eye(gram.shape[0], device=z.device, dtype=z.dtype)
        # cholesky_ex: no host sync, and no exception when the matrix is not positive
        # definite, which only non-finite embeddings (a diverged step) can make; the
        # loss is then NaN and the non-finite guard skips the step like any other.
        chol, info = torch.linalg.cholesky_ex(eye + scale * gram)
        value = torch.log(torch.diagonal(chol)).sum()  # 1/2 logdet = sum log diag(L)
        return torch.where(info == 0, value, torch.full_like(value, float("nan")))


class Renyi2Entropy(nn.Module):
    """Matrix-based Renyi entropy of order 2: H_2(K) = -log ||K||_F^2.

    K = Z Z^T / n has unit trace for unit rows, so H_2 lies in [0, log n]:
    0 when every embedding is the same, log n when they are orthogonal.
    """

    @float32_forward
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = F.normalize(z, dim=1)
        k = z @ z.T / z.shape[0]
        return -torch.log((k * k).sum())


ENTROPY_ESTIMATORS = ("coding_rate", "renyi2")


def build_entropy(name: str, coding_rate_eps: float = 0.5) -> nn.Module:
    if name == "coding_rate":
        return CodingRateEntropy(coding_rate_eps)
    if name == "renyi2":
        return Renyi2Entropy()
    raise ValueError(f"unknown entropy estimator {name!r}; choose one of {ENTROPY_ESTIMATORS}")
