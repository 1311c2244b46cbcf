"""InfoNCE with in-batch negatives (van den Oord et al. 2018; MoCo v3's form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iecl.model.losses.precision import float32_forward


class InfoNCE(nn.Module):
    """L = -1/B sum_i log( exp(q_i.k_i / tau) / sum_j exp(q_i.k_j / tau) ).

    `q` and `k` are `(B, d)`; both are L2-normalised here (cosine similarity).
    The positive for row i is k_i, every other k_j is a negative. The minimum
    is not 0: with B - 1 negatives at similarity -1/(B-1) it is approached,
    and at chance (all similarities equal) the loss is log(B).
    """

    def __init__(self, tau: float = 0.2) -> None:
        super().__init__()
        self.tau = tau

    @float32_forward
    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(q, dim=1)
        k = F.normalize(k, dim=1)
        logits = q @ k.T / self.tau  # (B, B): diagonal = positives
        labels = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, labels)
