"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning").

    z1, z2 = f(x1), f(x2)                 backbone + 3-layer projector, shared
    p1, p2 = h(z1), h(z2)                 bottleneck predictor
    loss = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2     Eq. 3-4, D = -cosine (Eq. 1)

No momentum encoder: the stop-gradient alone prevents collapse. The predictor
keeps a fixed learning rate (the paper's Section 4.1 / its code's fix_pred_lr):
its parameter groups carry `fixed_lr: True`.

x1 is the anchor and x2 the query. SAIB (when enabled) transforms the query
before the encoder: in the first term its z2 is the *target* (stop-gradient);
the second term sends it through the predictor, which is where SAIB's gradient
comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from iecl.model.encoder import Encoder
from iecl.model.heads import MLPBNProjector, SimSiamPredictor
from iecl.model.losses import NegativeCosineSimilarity
from iecl.model.methods.base import Embeddings, Losses, Method, Parts, decay_groups
from iecl.model.methods.registry import register
from iecl.model.spectral import once_per_step


@register
class SimSiam(Method):
    name = "simsiam"
    nce_directions = 0

    @dataclass
    class Hyper:
        """SimSiam Section 4.1: a 512-wide bottleneck predictor."""

        predictor_hidden: int = 512

    def build(self, parts: Parts, h: Hyper) -> None:
        trunk = parts.backbone
        # SimSiam's projector is exactly this layout (3 bias-free Linear-BN, no ReLU and
        # no affine on the last BN); the reference code's last Linear has a frozen bias.
        self.encoder = Encoder(trunk, MLPBNProjector(trunk.feature_dim, parts.projector_hidden, parts.projector_out))
        self.predictor = SimSiamPredictor(parts.projector_out, h.predictor_hidden)
        self.criterion = NegativeCosineSimilarity()

    def loss_on_views(self, anchor: torch.Tensor, query: torch.Tensor) -> tuple[Losses, Embeddings]:
        with once_per_step():
            z_anchor, z_query = self.encoder(anchor, query)  # each view its own BatchNorm statistics
        p_anchor, p_query = self.predictor(z_anchor), self.predictor(z_query)
        loss = self.criterion(p_anchor, z_query.detach()) / 2 + self.criterion(p_query, z_anchor.detach()) / 2
        return {"loss": loss}, (z_anchor.detach(), z_query.detach())

    def encoders(self) -> dict[str, nn.Module]:
        return {"online": self.encoder}

    def trainable_modules(self) -> list[nn.Module]:
        return [self.encoder, self.predictor]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The base class's groups (SAIB's included) with the predictor's taken out
        into its own decay / no-decay groups at a fixed learning rate."""
        predictor = [{**group, "fixed_lr": True}
                     for group in decay_groups(self.predictor, weight_decay, prefix="predictor_") if group["params"]]
        in_predictor = {id(p) for group in predictor for p in group["params"]}
        groups = []
        for group in super().param_groups(weight_decay):
            params = [p for p in group["params"] if id(p) not in in_predictor]
            if params:
                groups.append({**group, "params": params})
        return groups + predictor

    def backbone(self) -> nn.Module:
        return self.encoder.backbone
