"""IE-CL: Incremental-Entropy Contrastive Learning (paper Algorithm 1, Eq. 17),
with the decisions of DESIGN.md "The method".

    query'  = SAIB(query)                       entropy generation, query view only
    q_a, q_q = online(anchor), online(query')   trained by backprop
    k_a, k_q = target(anchor), target(query')   EMA of online, no gradient
    loss = InfoNCE(q_a, k_q) + InfoNCE(q_q, k_a)     symmetric (paper 4.1)
         + beta * KL(N(q_q) || N(q_a))               Gaussian fits, neither side detached
         - lambda * H(q_q)                           pluggable entropy estimator

Entropy preservation (spectral norm on every encoder conv) is architectural and
lives in the backbone. SAIB's weight decay gamma is its own parameter group.
Algorithm 1 detaches the query side of the KL, which would leave SAIB
constrained by nothing but the entropy term; this implementation does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from iecl.model.encoder import Encoder, ema_update, momentum_copy
from iecl.model.heads import MLPBNProjector
from iecl.model.losses import GaussianKL, InfoNCE, build_entropy
from iecl.model.methods.base import Embeddings, Losses, Method, Parts
from iecl.model.methods.registry import register
from iecl.model.spectral import once_per_step


@register
class IECL(Method):
    name = "iecl"
    spectral_norm = True  # entropy preservation (paper Section 3.3)
    nce_directions = 2

    @dataclass
    class Hyper:
        """Paper Section 4.1; tau is MoCo v2's (the paper gives none)."""

        momentum: float = 0.9
        tau: float = 0.2
        lambda_entropy: float = 0.2
        beta_kl: float = 0.09
        entropy: str = "coding_rate"
        coding_rate_eps: float = 0.5

    def build(self, parts: Parts, h: Hyper) -> None:
        trunk = parts.backbone
        self.online = Encoder(trunk, MLPBNProjector(trunk.feature_dim, parts.projector_hidden, parts.projector_out))
        self.target = momentum_copy(self.online)
        self.momentum = h.momentum
        self.lambda_entropy, self.beta_kl = h.lambda_entropy, h.beta_kl
        self.infonce = InfoNCE(h.tau)
        self.kl = GaussianKL()
        self.entropy = build_entropy(h.entropy, h.coding_rate_eps)

    def loss_on_views(self, anchor: torch.Tensor, query: torch.Tensor) -> tuple[Losses, Embeddings]:
        # Each view keeps its own BatchNorm statistics (model/encoder.py: two trunk
        # calls, or one with model.fused_views). Within `once_per_step()`, each
        # spectral-normalised weight (one power iteration, one division) is computed
        # once per step, not once per encoder call, so online and both views see
        # the same normalised weights.
        with once_per_step():
            q_anchor, q_query = self.online(anchor, query)
            with torch.no_grad():
                k_anchor, k_query = self.target(anchor, query)
        loss_nce = self.infonce(q_anchor, k_query) + self.infonce(q_query, k_anchor)
        loss_kl = self.kl(q_query, q_anchor)
        entropy = self.entropy(q_query)
        loss = loss_nce + self.beta_kl * loss_kl - self.lambda_entropy * entropy
        losses = {"loss": loss, "loss_nce": loss_nce, "loss_kl": loss_kl, "entropy": entropy}
        return losses, (q_anchor.detach(), q_query.detach())

    def nce_candidates(self, batch_size: int) -> int:
        return batch_size  # each query against the B keys of the batch

    def encoders(self) -> dict[str, nn.Module]:
        return {"online": self.online, "target": self.target}

    def trainable_modules(self) -> list[nn.Module]:
        return [self.online]

    def momentum_update(self, progress: float, finite: torch.Tensor | None = None) -> None:
        ema_update(self.target, self.online, self.momentum, finite)

    def backbone(self) -> nn.Module:
        return self.online.backbone
