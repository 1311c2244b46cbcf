"""The interface every self-supervised method implements.

The training loop knows only this: it hands each step's two prepared views
(normalised, channels-last, on the device) to `training_step`, back-propagates
`losses["loss"]`, steps the optimizer over `param_groups`, then calls
`momentum_update`. Everything method-specific stays in the method's file.
"""

from __future__ import annotations

import torch
from torch import nn

from model.encoder import Encoder


class Method(nn.Module):
    #: name of the method in configs and the registry
    name: str = ""

    def training_step(self, anchor: torch.Tensor, query: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both views (B, 3, H, W) -> {"loss": scalar to minimise, other named scalars to log}."""
        raise NotImplementedError

    def step_on_views(self, anchor_u8: torch.Tensor, query_u8: torch.Tensor, prepare) -> dict[str, torch.Tensor]:
        """`training_step` from the loader's uint8 NHWC views; `prepare(view_u8)`
        normalises one view. Methods that can fuse the preparation into their
        first op (IE-CL's SAIB on the query) override this."""
        return self.training_step(prepare(anchor_u8), prepare(query_u8))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; each may carry its own `weight_decay`."""
        raise NotImplementedError

    def momentum_update(self, progress: float) -> None:
        """Update momentum (target) networks; `progress` in [0, 1] is the training fraction.
        Methods without a momentum network leave this as a no-op."""

    def backbone(self) -> nn.Module:
        """The backbone that evaluation (kNN, linear probe) uses."""
        raise NotImplementedError

    def compile_encoders(self) -> None:
        """`torch.compile` every encoder in place (state_dict keys stay the same)."""
        for module in self.children():
            if isinstance(module, Encoder):
                module.compile()


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weights decay; norms, biases and other 1-D parameters do not (timm's rule)."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]
