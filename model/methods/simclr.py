"""SimCLR (Chen, Kornblith, Norouzi & Hinton 2020, "A Simple Framework for
Contrastive Learning of Visual Representations").

    z_a, z_q = g(f(anchor)), g(f(query))   one encoder, both views in one forward
    loss = NT-Xent(z_a, z_q; tau)          SimCLR Eq. 1 over the 2N views

The two views go through the encoder as one 2B batch, as SimCLR's code does, so
BatchNorm normalises them with shared statistics. SimCLR aggregates those
statistics over all devices (global BN); this implementation does not (per
device BN, unless the caller converts the model to SyncBatchNorm). Under
torch.distributed the embeddings are gathered from all ranks with gradient, so
the negatives are the global batch's (model/losses/ntxent.py).

SAIB (when enabled) transforms the loader's second view, the *query*, before the
encoder; NT-Xent is symmetric in its two views, so the query is both a query
and a positive/negative of the other views, and SAIB gets its gradient through z_q.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from iecl.model.distributed import world_size
from iecl.model.encoder import Encoder
from iecl.model.heads import SimCLRProjector
from iecl.model.losses import NTXent
from iecl.model.methods.base import Embeddings, Losses, Method, Parts
from iecl.model.methods.registry import register
from iecl.model.spectral import once_per_step


@register
class SimCLR(Method):
    name = "simclr"
    recipe = "simclr"
    nce_directions = 1  # NT-Xent averages over all 2N views: one softmax per view

    @dataclass
    class Hyper:
        """SimCLR's temperature for its large-batch runs."""

        tau: float = 0.1

    def build(self, parts: Parts, h: Hyper) -> None:
        trunk = parts.backbone
        self.encoder = Encoder(trunk, SimCLRProjector(trunk.feature_dim, parts.projector_hidden, parts.projector_out))
        self.ntxent = NTXent(h.tau)

    def loss_on_views(self, anchor: torch.Tensor, query: torch.Tensor) -> tuple[Losses, Embeddings]:
        with once_per_step():
            z_anchor, z_query = self.encoder(torch.cat([anchor, query])).chunk(2)
        loss_nce = self.ntxent(z_anchor, z_query)
        return {"loss": loss_nce, "loss_nce": loss_nce}, (z_anchor.detach(), z_query.detach())

    def nce_candidates(self, batch_size: int) -> int:
        return 2 * batch_size * world_size() - 1  # every other view of the global batch

    def encoders(self) -> dict[str, nn.Module]:
        return {"online": self.encoder}

    def trainable_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def backbone(self) -> nn.Module:
        return self.encoder.backbone
