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

import torch
from torch import nn
from torch.nn.utils import parametrize

from iecl.model.distributed import world_size
from iecl.model.encoder import Encoder
from iecl.model.heads import SimCLRProjector
from iecl.model.losses import NTXent
from iecl.model.methods.base import Embeddings, Losses, Method
from iecl.model.resnet import build_backbone


class SimCLR(Method):
    name = "simclr"
    nce_directions = 1  # NT-Xent averages over all 2N views: one softmax per view

    def __init__(
        self,
        *,
        backbone: str = "resnet50",
        spectral_norm: bool = False,
        projector_hidden: int = 2048,
        projector_out: int = 128,
        batch_size: int = 256,
        image_size: int = 224,
        saib: bool = False,
        patch_size: int = 16,
        saib_weight_decay: float = 1e-4,
        saib_impl: str = "reference",
        tau: float = 0.1,
    ) -> None:
        super().__init__()
        trunk = build_backbone(backbone, spectral_norm)
        self.encoder = Encoder(trunk, SimCLRProjector(trunk.feature_dim, projector_hidden, projector_out))
        self.build_saib(saib, batch_size, image_size, patch_size, saib_weight_decay, saib_impl)
        self.ntxent = NTXent(tau)

    def loss_on_views(self, anchor: torch.Tensor, query: torch.Tensor) -> tuple[Losses, Embeddings]:
        with parametrize.cached():
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
