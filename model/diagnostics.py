"""Cheap diagnostics of a batch of embeddings, for logging next to the losses.

All of them run without gradient and in float32, with autocast switched off, on
whatever device the embeddings live on; none of them is a training objective.

- `effective_rank`: how many directions the batch really uses (collapse -> 1).
- `renyi2_entropy`: the matrix-based Renyi-2 entropy of *Information Flow in
  Self-Supervised Learning* (Tan et al.; the same estimator IE-CL can use as
  its entropy term, `model.losses.Renyi2Entropy`, reused here).
- `infonce_mi_bound` / `infonce_mi_ceiling`: the InfoNCE lower bound on the
  mutual information between the two views, and the most it can ever report
  (the log(2K - 1) ceiling of *Towards a Rigorous Analysis of Mutual
  Information in Contrastive Learning*, Lee et al. 2023, arXiv:2308.15704).

How the bound applies to this project's loss (model/losses/infonce.py): with a
batch of B pairs, `InfoNCE(q, k)` scores each query q_i against the B keys
k_1..k_B (its own positive and B - 1 in-batch negatives; queries are never
compared with other queries), so every softmax has N = B candidates and
I(q; k) >= log(B) - L. Its ceiling is therefore log(B), not the log(2K - 1) of
SimCLR's NT-Xent, where each of the 2K views is contrasted with all 2K - 1
others. IE-CL's `loss_nce` is the *sum* of the two directions
(`InfoNCE(q_a, k_q) + InfoNCE(q_q, k_a)`), so `diagnostics` divides it by 2
before taking the per-direction bound. Each method states its own candidates
and directions (`Method.nce_candidates`, `Method.nce_directions`); SimCLR's
NT-Xent has 2B - 1 candidates, so its ceiling is the paper's log(2K - 1).
"""

from __future__ import annotations

import math

import torch

from iecl.model.losses.entropy import Renyi2Entropy

_RENYI2 = Renyi2Entropy()


@torch.no_grad()
def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli (2007) effective rank of a batch `(N, D)`: exp(H(p)), p = s / sum(s).

    s are the singular values of the batch *centred* over its rows (the mean
    embedding is removed first), so a common offset shared by every embedding
    is not counted as a direction. Lies in [1, min(N - 1, D)] (1 also for a
    fully collapsed batch); equals r exactly when the centred batch has r equal
    non-zero singular values, and is below r when they are unequal. Returns a
    float32 scalar tensor on z's device.
    """
    with torch.autocast(z.device.type, enabled=False):
        z = z.detach().float()
        z = z - z.mean(dim=0, keepdim=True)
        s = torch.linalg.svdvals(z)
        p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny)
        entropy = -torch.special.xlogy(p, p).sum()  # 0 log 0 = 0
        return torch.exp(entropy)


@torch.no_grad()
def renyi2_entropy(z: torch.Tensor) -> torch.Tensor:
    """Matrix-based Renyi entropy of order 2: H_2 = -log tr(K^2), K = Z Z^T / N.

    Z is the batch `(N, D)` with L2-normalised rows, so tr K = 1 and H_2 lies
    in [0, log N]: 0 for identical embeddings, log N for orthonormal ones.
    This is exactly `model.losses.Renyi2Entropy` (tr(K^2) = ||K||_F^2 for a
    symmetric K), which already runs in float32 outside autocast; it is called
    here rather than re-implemented.
    """
    return _RENYI2(z.detach())


def infonce_mi_bound(loss_nce: float | torch.Tensor, negatives: int) -> torch.Tensor:
    """InfoNCE lower bound on the views' mutual information: log(N) - L, in nats.

    N = 1 + negatives is the number of candidates in each softmax and L is the
    mean InfoNCE loss of *one* direction. For this project's `InfoNCE` with a
    batch of B pairs, negatives = B - 1 (see the module docstring).
    """
    if negatives < 0:
        raise ValueError(f"negatives must be >= 0, got {negatives}")
    loss = torch.as_tensor(loss_nce).detach().float()
    return math.log(1 + negatives) - loss


def infonce_mi_ceiling(batch_size: int) -> float:
    """log(2K - 1): the largest MI a symmetric in-batch (NT-Xent) loss on K pairs can report.

    This is the ceiling of *Towards a Rigorous Analysis of Mutual Information in Contrastive Learning* (Lee et al. 2023, arXiv:2308.15704), where
    each of the 2K views is contrasted with the other 2K - 1. This project's
    `InfoNCE` contrasts a query only with the B keys, so its own ceiling is
    log(B) (`infonce_mi_bound(0.0, B - 1)`); `diagnostics` reports both.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return math.log(2 * batch_size - 1)


@torch.no_grad()
def diagnostics(
    z_query: torch.Tensor,
    z_anchor: torch.Tensor,
    loss_nce: float | torch.Tensor | None = None,
    *,
    candidates: int = 0,
    directions: int = 1,
) -> dict[str, float]:
    """All diagnostics of one step, as plain floats ready for `MetricsLog.log`.

    `loss_nce` is the contrastive loss as the method returns it: the sum over
    `directions` InfoNCE terms, each a softmax over `candidates` (the positive
    and the negatives: B for IE-CL's in-batch InfoNCE, 2B - 1 for SimCLR's
    NT-Xent, 1 + queue size for MoCo). Without it (BYOL, SimSiam: no
    contrastive loss) only the embedding measures are returned.
    """
    measured = {
        "effective_rank_query": effective_rank(z_query),
        "effective_rank_anchor": effective_rank(z_anchor),
        "renyi2_query": renyi2_entropy(z_query),
        "renyi2_anchor": renyi2_entropy(z_anchor),
    }
    if loss_nce is not None:
        per_direction = torch.as_tensor(loss_nce, device=z_query.device).detach().float() / directions
        measured["mi_bound"] = infonce_mi_bound(per_direction, candidates - 1)
    values = torch.stack(list(measured.values())).tolist()  # one device sync, not five
    result = dict(zip(measured, values, strict=True))
    if loss_nce is not None:
        result["mi_ceiling"] = math.log(candidates)
    return result
