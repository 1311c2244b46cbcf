"""Cosine-similarity regression losses of the non-contrastive methods.

Neither stops a gradient: the caller passes its target already detached
(`loss(p, z.detach())`), so the stop-gradient is visible where the method is.
Both are invariant to the scale of either input (they compare directions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iecl.model.losses.precision import float32_forward


class NegativeCosineSimilarity(nn.Module):
    """SimSiam's D(p, z) = - p/||p||_2 . z/||z||_2 (Chen & He 2021, Eq. 1),
    averaged over the batch. Lies in [-1, 1]; -1 when p and z are aligned."""

    @float32_forward
    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -(F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1).mean()


class NormalizedMSE(nn.Module):
    """BYOL's L = || q/||q|| - z'/||z'|| ||_2^2 = 2 - 2 <q, z'> / (||q|| ||z'||)
    (Grill et al. 2020, Eq. 2), averaged over the batch. Lies in [0, 4]."""

    @float32_forward
    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (2 - 2 * (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1)).mean()
