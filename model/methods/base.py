"""The interface every self-supervised method implements.

The training loop knows only this: it hands each step's two uint8 views to
`step_on_views` (by calling the method, possibly wrapped in
DistributedDataParallel: `forward` is `step_on_views`), back-propagates `losses["loss"]`, steps the optimizer over
`param_groups`, then calls `momentum_update`. Everything method-specific stays
in the method's file.

SAIB is plug-and-play (paper Table 5): a method built with `saib=True` owns a
`SAIB` that transforms the loader's second view (the *query*) before that view
enters any branch. For the contrastive methods that view is the query side;
for BYOL and SimSiam it is the view the first loss term uses as its target
(the symmetric term sends it through the online branch too, which is how
SAIB's weights get their gradient). Methods implement `loss_on_views` on the
prepared (normalised, SAIB-transformed) views; this class does the rest.
"""

from __future__ import annotations

import torch
from torch import nn

from iecl.model.encoder import Encoder
from iecl.model.saib import SAIB


class Method(nn.Module):
    #: name of the method in configs and the registry
    name: str = ""
    #: for the InfoNCE mutual-information diagnostics: candidates in each
    #: softmax of `loss_nce` and the number of directions it sums (0: the
    #: method has no contrastive loss, so no bound is reported)
    nce_directions: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.saib: SAIB | None = None
        self.saib_weight_decay = 0.0
        #: the last step's online embeddings (anchor, query), detached; for diagnostics
        self.embeddings: tuple[torch.Tensor, torch.Tensor] | None = None

    def build_saib(self, enabled: bool, batch_size: int, image_size: int, patch_size: int,
                   weight_decay: float, impl: str) -> None:
        self.saib = SAIB(batch_size, (image_size, image_size), patch_size, impl=impl) if enabled else None
        self.saib_weight_decay = weight_decay

    # ------------------------------------------------------------- the step

    def loss_on_views(self, anchor: torch.Tensor, query: torch.Tensor) -> dict[str, torch.Tensor]:
        """Prepared views (B, 3, H, W), the query already through SAIB ->
        {"loss": scalar to minimise, other named scalars to log}. Set
        `self.embeddings` to the online embeddings of both views (detached)."""
        raise NotImplementedError

    def training_step(self, anchor: torch.Tensor, query: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both prepared views (B, 3, H, W) -> the losses."""
        return self.loss_on_views(anchor, self.saib(query) if self.saib is not None else query)

    def step_on_views(self, anchor_u8: torch.Tensor, query_u8: torch.Tensor, prepare) -> dict[str, torch.Tensor]:
        """`training_step` from the loader's uint8 NHWC views; `prepare(view_u8)`
        normalises one view. With SAIB the query's normalisation is SAIB's first
        load (fused with kernels.saib_impl=triton): the normalised query is
        never written."""
        if self.saib is None:
            return self.loss_on_views(prepare(anchor_u8), prepare(query_u8))
        query = self.saib.forward_uint8(query_u8, prepare.mean, prepare.std, prepare.dtype)
        return self.loss_on_views(prepare(anchor_u8), query)

    def forward(self, anchor_u8: torch.Tensor, query_u8: torch.Tensor, prepare) -> dict[str, torch.Tensor]:
        """`step_on_views`, as a module call: DistributedDataParallel hooks the
        gradient averaging into `forward`, so the loop calls the (wrapped) method."""
        return self.step_on_views(anchor_u8, query_u8, prepare)

    def nce_candidates(self, batch_size: int) -> int:
        """Candidates (1 positive + negatives) in each softmax of `loss_nce`."""
        raise NotImplementedError(f"{self.name} has no contrastive loss")

    # ------------------------------------------------------------- optimisation

    def trainable_modules(self) -> list[nn.Module]:
        """Modules trained by back-propagation (SAIB excluded: it has its own group)."""
        raise NotImplementedError

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; each may carry its own `weight_decay`,
        and `fixed_lr: True` to keep the base learning rate (no schedule)."""
        groups = []
        for module in self.trainable_modules():
            groups += decay_groups(module, weight_decay)
        groups = _merge_by_name(groups)
        if self.saib is not None:
            groups.append({"params": list(self.saib.parameters()), "weight_decay": self.saib_weight_decay, "group": "saib"})
        return groups

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


def decay_groups(module: nn.Module, weight_decay: float, prefix: str = "") -> list[dict]:
    """Weights decay; norms, biases and other 1-D parameters do not (timm's rule)."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": f"{prefix}decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": f"{prefix}no_decay"},
    ]


def _merge_by_name(groups: list[dict]) -> list[dict]:
    merged: dict[str, dict] = {}
    for group in groups:
        if group["group"] in merged:
            merged[group["group"]]["params"] += group["params"]
        else:
            merged[group["group"]] = {**group, "params": list(group["params"])}
    return [g for g in merged.values() if g["params"]]
