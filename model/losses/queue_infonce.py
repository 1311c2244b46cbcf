"""MoCo's InfoNCE against a queue of negative keys (He et al. 2020, Eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iecl.model.losses.precision import float32_forward


class QueueInfoNCE(nn.Module):
    """L_q = -log( exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_{k- in queue} exp(q.k- / tau)) ),
    averaged over the batch (MoCo Eq. 1).

    `q`, `k` are `(B, d)`: row i's positive is k_i (no in-batch negatives, as
    in MoCo); `queue` is `(K, d)` of negatives, already L2-normalised (the
    queue stores them so). q and k are L2-normalised here. Logits are laid out
    [positive, K negatives] and the label is 0: K + 1 candidates per softmax,
    log(K + 1) at chance.
    """

    def __init__(self, tau: float = 0.2) -> None:
        super().__init__()
        self.tau = tau

    @float32_forward
    def forward(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        q = F.normalize(q, dim=1)
        k = F.normalize(k, dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
        negative = q @ queue.T  # (B, K)
        logits = torch.cat([positive, negative], dim=1) / self.tau
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels)
