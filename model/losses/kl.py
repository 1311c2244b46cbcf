"""KL divergence between Gaussian fits of two embedding batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iecl.model.losses.precision import float32_forward


class GaussianKL(nn.Module):
    """KL(p || q) with p, q diagonal Gaussians fitted to two batches.

    IE-CL's semantic-consistency term beta * KL(p_query || p_anchor) (paper
    Eq. 15). The paper's closed form (Eq. 16) assumes an isotropic anchor
    Gaussian; DESIGN.md point 6 fits mean and diagonal variance to each side:

        KL = 1/2 sum_d [ log(s_q/s_p) + (s_p + (m_p - m_q)^2) / s_q - 1 ]

    over the L2-normalised embeddings (the space the contrastive loss uses).
    Neither side is detached: the gradient through p (the SAIB view) is what
    keeps SAIB within semantic bounds. `eps` floors the variances so a
    collapsed dimension gives a large, finite penalty rather than inf.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    @float32_forward
    def forward(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        p = F.normalize(p, dim=1)
        q = F.normalize(q, dim=1)
        mean_p, var_p = p.mean(0), p.var(0, unbiased=False) + self.eps
        mean_q, var_q = q.mean(0), q.var(0, unbiased=False) + self.eps
        kl = torch.log(var_q / var_p) + (var_p + (mean_p - mean_q) ** 2) / var_q - 1.0
        return 0.5 * kl.sum()
