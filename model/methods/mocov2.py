"""MoCo v2 (Chen, Fan, Girshick & He 2020, "Improved Baselines with Momentum
Contrastive Learning"): MoCo (He et al. 2020) with an MLP head, the stronger
augmentation recipe and a cosine learning-rate schedule.

    q = online(query)                 backbone + 2-layer MLP head, trained by backprop
    k = target(anchor)                momentum (EMA) copy, no gradient
    loss = InfoNCE(q, k+ ; queue)     MoCo Eq. 1, tau = 0.2, K negatives from the queue
    enqueue(k)                        after the loss, oldest keys out

`symmetric=True` adds the mirrored term, InfoNCE(online(anchor), target(query)),
both terms scored against the queue as it was before the step; the step's 2B
keys (anchor's, then query's) are then enqueued once.

SAIB (when enabled) transforms the loader's second view, the *query*, before it
reaches any encoder: the view the trained branch sees (and, when symmetric, the
mirrored term's key). Its gradient arrives through q.

Keys are gathered from every rank before they are enqueued, so with B per rank
the queue advances by B * world (2B * world when symmetric) and every rank holds
the same queue. MoCo's shuffling BatchNorm is not implemented: the key encoder
normalises each key with statistics of the very sub-batch whose queries it is
compared against, so positives can share a batch-statistics signature the
network may learn to exploit ("cheating", MoCo Section 3.3). MoCo shuffles the
key batch across GPUs to prevent that; on one device (and under per-device
BatchNorm) this implementation has the leak, which MoCo reports as a lower
accuracy, not a failure to learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from iecl.model.distributed import gather_no_grad
from iecl.model.encoder import Encoder, ema_update, momentum_copy
from iecl.model.heads import MoCoV2Head
from iecl.model.losses import QueueInfoNCE
from iecl.model.methods.base import Embeddings, Losses, Method, Parts
from iecl.model.methods.registry import register
from iecl.model.spectral import once_per_step

#: the queue's initial random keys: one fixed seed, so every rank starts with
#: the same queue without any communication
_QUEUE_SEED = 0


class KeyQueue(nn.Module):
    """A FIFO of `size` L2-normalised keys (`keys`, (size, dim)), written in a ring.

    `keys` and the write pointer `ptr` are buffers, so the queue is part of the
    state_dict and a resumed run continues with exactly the same negatives. It
    starts, as in MoCo, with random unit vectors.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(_QUEUE_SEED)
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write `keys` (n, dim) of this rank, gathered from all ranks (rank order),
        over the oldest entries; wraps around. Keeps only the newest `size` when
        more arrive. The keys are L2-normalised here."""
        keys = F.normalize(gather_no_grad(keys.detach()).to(self.keys.dtype), dim=1)
        n = keys.shape[0]
        kept = min(n, self.size)
        # Where sequential writes of all n keys would leave the last `kept` of them;
        # computed on the device (no host sync on ptr).
        slots = (self.ptr + torch.arange(n - kept, n, device=self.keys.device)) % self.size
        self.keys.index_copy_(0, slots, keys[n - kept:])
        self.ptr.copy_((self.ptr + n) % self.size)


@register
class MoCoV2(Method):
    name = "mocov2"
    nce_directions = 1

    @dataclass
    class Hyper:
        """MoCo v2 (its paper and code): tau 0.2, m 0.999, K 65,536, one direction."""

        tau: float = 0.2
        momentum: float = 0.999
        queue_size: int = 65536
        symmetric: bool = False

    def build(self, parts: Parts, h: Hyper) -> None:
        trunk = parts.backbone
        self.online = Encoder(trunk, MoCoV2Head(trunk.feature_dim, parts.projector_hidden, parts.projector_out))
        self.target = momentum_copy(self.online)
        self.queue = KeyQueue(h.queue_size, parts.projector_out)
        self.momentum = h.momentum
        self.symmetric = h.symmetric
        self.nce_directions = 2 if h.symmetric else 1
        self.infonce = QueueInfoNCE(h.tau)

    def loss_on_views(self, anchor: torch.Tensor, query: torch.Tensor) -> tuple[Losses, Embeddings]:
        # `once_per_step()`: each spectral-normalised weight is computed once per step (see IE-CL).
        # Each view with its own BatchNorm statistics (model/encoder.py).
        with once_per_step():
            if self.symmetric:
                q_anchor, q_query = self.online(anchor, query)
                with torch.no_grad():
                    k_anchor, k_query = self.target(anchor, query)
            else:
                q_anchor, q_query = None, self.online(query)
                with torch.no_grad():
                    k_anchor, k_query = self.target(anchor), None
        # A copy: backward needs the negatives (dL/dq = ... @ queue) after `enqueue`
        # has overwritten the buffer in place, and both terms must see the same queue.
        negatives = self.queue.keys.clone()
        loss_nce = self.infonce(q_query, k_anchor, negatives)
        if self.symmetric:
            loss_nce = loss_nce + self.infonce(q_anchor, k_query, negatives)
        if self.training:
            self.queue.enqueue(torch.cat([k_anchor, k_query]) if self.symmetric else k_anchor)
        # The asymmetric form never sends the anchor through the online encoder; a
        # forward only for diagnostics would cost a quarter of the step and move the
        # online BatchNorm statistics, so its anchor embedding is the key instead.
        z_anchor = q_anchor if q_anchor is not None else k_anchor
        return {"loss": loss_nce, "loss_nce": loss_nce}, (z_anchor.detach(), q_query.detach())

    def nce_candidates(self, batch_size: int) -> int:
        return 1 + self.queue.size  # the positive key and the whole queue

    def encoders(self) -> dict[str, nn.Module]:
        return {"online": self.online, "target": self.target}

    def trainable_modules(self) -> list[nn.Module]:
        return [self.online]

    def momentum_update(self, progress: float, finite: torch.Tensor | None = None) -> None:
        ema_update(self.target, self.online, self.momentum, finite)  # constant m (MoCo)

    def backbone(self) -> nn.Module:
        return self.online.backbone
