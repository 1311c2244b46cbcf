"""Backbone + projector, and the momentum (EMA) copy of it."""

from __future__ import annotations

import copy

import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> embeddings (B, out_dim)."""
        return self.projector(self.backbone(x))


def momentum_copy(online: nn.Module) -> nn.Module:
    """A frozen copy to be updated only by `ema_update`."""
    target = copy.deepcopy(online)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float, finite: torch.Tensor | None = None) -> None:
    """target <- m * target + (1 - m) * online, as one multi-tensor op.

    Parameters only: the target's BatchNorm statistics and spectral-norm power
    iteration vectors come from its own forwards (MoCo's convention). With
    `finite` (a device bool: the step's loss was finite) the update is made
    only where it is true, decided on the device (a lerp by 0 leaves the
    target exactly as it was).
    """
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    weight = 1.0 - momentum
    if finite is not None:
        weight = finite.to(target_params[0].dtype) * weight
    torch._foreach_lerp_(target_params, online_params, weight)
