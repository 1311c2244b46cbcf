"""NT-Xent, SimCLR's normalised temperature-scaled cross-entropy (Chen et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iecl.model.distributed import gather_with_grad
from iecl.model.losses.precision import float32_forward


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """NT-Xent of N pairs of L2-normalised rows `(N, d)`, logits = cosine * scale
    (scale = 1 / tau): each of the 2N views against the other 2N - 1, mean
    cross-entropy over all 2N. So log(2N - 1) - L is the InfoNCE bound on the
    pairs' mutual information and log(2N - 1) its ceiling (`iecl mi` uses this
    with a learned scale)."""
    z = torch.cat([z_a, z_b]).float()
    n = z_a.shape[0]
    logits = z @ z.T * scale
    logits.fill_diagonal_(float("-inf"))  # a view is not its own candidate
    labels = torch.arange(2 * n, device=z.device).roll(n)  # i -> (i + n) mod 2n
    return F.cross_entropy(logits, labels)


class NTXent(nn.Module):
    """SimCLR Eq. 1, averaged over all 2N views of N pairs:

        l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) )
        L = 1/(2N) sum_k [ l(2k-1, 2k) + l(2k, 2k-1) ]

    with sim the cosine similarity. Each view's positive is its partner and the
    other 2N - 2 views are its negatives (self-similarity is masked out), so
    every softmax has 2N - 1 candidates; at chance the loss is log(2N - 1).

    `z_a`, `z_b` are this rank's `(B, d)` embeddings of the two views. Under
    torch.distributed both are gathered from every rank with gradient, so
    N = B * world and the negatives come from the global batch. Rows are laid
    out [a of rank 0..W-1, b of rank 0..W-1], so row i's positive is
    (i + N) mod 2N whatever rank the pair came from. Every rank computes this
    same global loss (a 2N x 2N matrix, small next to the encoder), so the value
    is the global batch's on every rank; see model/distributed.py for why the
    gradient is then right under DistributedDataParallel.
    """

    def __init__(self, tau: float = 0.1) -> None:
        super().__init__()
        self.tau = tau

    @float32_forward
    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        z_a = F.normalize(gather_with_grad(z_a), dim=1)
        z_b = F.normalize(gather_with_grad(z_b), dim=1)
        return nt_xent(z_a, z_b, 1.0 / self.tau)
