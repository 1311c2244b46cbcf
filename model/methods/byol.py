"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent").

    z, z'   = g_theta(f_theta(v)), g_theta(f_theta(v'))   online projections
    p, p'   = q_theta(z), q_theta(z')                     online predictions
    t, t'   = g_xi(f_xi(v)), g_xi(f_xi(v'))               target, no gradient
    loss = L + L~ = NMSE(p, sg(t')) + NMSE(p', sg(t))     Eq. 2 and its mirror
    xi <- m xi + (1 - m) theta,  m = 1 - (1 - m_base) (cos(pi k / K) + 1) / 2

with NMSE(p, t) = 2 - 2 cos(p, t) averaged over the batch. v is the anchor
(augmentation T) and v' the query (T'; the `byol` recipe's second view has blur
0.1 and solarisation 0.2).

SAIB (when enabled) transforms the query v' before any branch: in the first
term L it is the *target* input (no gradient there); the mirrored term L~ sends
it through the online branch, which is where SAIB's gradient comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from iecl.model.encoder import Encoder, ema_update, momentum_copy
from iecl.model.heads import BYOLMLP
from iecl.model.losses import NormalizedMSE
from iecl.model.methods.base import Embeddings, Losses, Method, Parts
from iecl.model.methods.registry import register
from iecl.model.spectral import once_per_step


def byol_momentum(base: float, progress: float) -> float:
    """BYOL's target decay rate at training fraction `progress`: `base` at 0, 1 at the end."""
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


@register
class BYOL(Method):
    name = "byol"
    recipe = "byol"
    nce_directions = 0

    @dataclass
    class Hyper:
        """BYOL Section 3.3: base momentum 0.99 (0.996 in its 1000-epoch runs), predictor width 4096."""

        momentum: float = 0.99
        predictor_hidden: int = 4096

    def build(self, parts: Parts, h: Hyper) -> None:
        trunk, out = parts.backbone, parts.projector_out
        self.online = Encoder(trunk, BYOLMLP(trunk.feature_dim, parts.projector_hidden, out))
        self.predictor = BYOLMLP(out, h.predictor_hidden, out)
        self.target = momentum_copy(self.online)
        self.base_momentum = h.momentum
        self.criterion = NormalizedMSE()

    def loss_on_views(self, anchor: torch.Tensor, query: torch.Tensor) -> tuple[Losses, Embeddings]:
        # Each view with its own BatchNorm statistics (BYOL's code; model/encoder.py).
        with once_per_step():
            z_anchor, z_query = self.online(anchor, query)
            with torch.no_grad():
                t_anchor, t_query = self.target(anchor, query)
        p_anchor, p_query = self.predictor(z_anchor), self.predictor(z_query)
        loss = self.criterion(p_anchor, t_query) + self.criterion(p_query, t_anchor)
        return {"loss": loss}, (z_anchor.detach(), z_query.detach())

    def encoders(self) -> dict[str, nn.Module]:
        return {"online": self.online, "target": self.target}

    def trainable_modules(self) -> list[nn.Module]:
        return [self.online, self.predictor]

    def momentum_update(self, progress: float, finite: torch.Tensor | None = None) -> None:
        ema_update(self.target, self.online, byol_momentum(self.base_momentum, progress), finite)

    def backbone(self) -> nn.Module:
        return self.online.backbone
