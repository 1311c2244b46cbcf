"""The interface every self-supervised method implements.

The training step (train/step.py) knows only this: it calls the method
(possibly wrapped in DistributedDataParallel) on the loader's two uint8
views, back-propagates `losses["loss"]`, steps the optimizer over
`param_groups`, then calls `momentum_update`. Everything method-specific
stays in the method's file.

The base class owns what every method does first: the view preparation
(`prepare`, a module: uint8 NHWC -> normalised, channels-last) and the
optional SAIB. SAIB is plug-and-play (paper Table 5): a method built with
`saib=True` owns a `SAIB` that transforms the loader's second view (the
*query*) before that view enters any branch, reading the uint8 view itself
(its first load is the view preparation). For the contrastive methods that
view is the query side; for BYOL and SimSiam it is the view the first loss
term uses as its target (the symmetric term sends it through the online
branch too, which is how SAIB's weights get their gradient). Methods
implement `loss_on_views` on the prepared views; this class does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from iecl.kernels.view_prep import ViewPrep
from iecl.model.encoder import use_compile_cache
from iecl.model.resnet import ResNet
from iecl.model.saib import SAIB
from iecl.pipeline.views import MEAN_255, STD_255

Losses = dict[str, torch.Tensor]
Embeddings = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Parts:
    """What every method is built from, made once by `build_method` (the
    methods add their own heads on top): the backbone and the projector's
    sizes. SAIB, when on, is attached after the method's own modules
    (`attach_saib`), so that the random initialisation keeps its order."""

    backbone: ResNet
    projector_hidden: int
    projector_out: int


class Method(nn.Module):
    #: name of the method in configs and the registry
    name: str = ""
    #: the method's own hyperparameters, with its paper's defaults: a dataclass
    #: whose fields are config keys (method.<field>, or model.<field>)
    Hyper: type = object
    #: the method's own choice where the config says null
    spectral_norm: bool = False
    recipe: str = "mocov2"
    #: for the InfoNCE mutual-information diagnostics: candidates in each
    #: softmax of `loss_nce` and the number of directions it sums (0: the
    #: method has no contrastive loss, so no bound is reported)
    nce_directions: int = 0

    def __init__(self, parts: Parts, hyper=None) -> None:
        super().__init__()
        #: the view preparation; train.factory sets the configured one (impl, dtype)
        self.prepare = ViewPrep("reference", MEAN_255, STD_255)
        self.saib: SAIB | None = None
        self.saib_weight_decay = 0.0
        self.hyper = hyper if hyper is not None else self.Hyper()
        self.build(parts, self.hyper)

    def build(self, parts: Parts, hyper) -> None:
        """The method's own modules (encoders, heads, losses) from the shared
        parts and its `Hyper`."""
        raise NotImplementedError

    def attach_saib(self, saib: SAIB, weight_decay: float) -> None:
        """SAIB on the query view, with its own weight decay (paper: gamma)."""
        self.saib, self.saib_weight_decay = saib, weight_decay

    # ------------------------------------------------------------- the step

    def forward(self, anchor_u8: torch.Tensor, query_u8: torch.Tensor) -> tuple[Losses, Embeddings]:
        """The step's forward, from the loader's uint8 (B, H, W, 3) views ->
        ({"loss": scalar to minimise, other named scalars to log},
        (online embedding of the anchor, of the query), both detached)."""
        query = self.saib(query_u8, self.prepare) if self.saib is not None else self.prepare(query_u8)
        return self.loss_on_views(self.prepare(anchor_u8), query)

    def loss_on_views(self, anchor: torch.Tensor, query: torch.Tensor) -> tuple[Losses, Embeddings]:
        """`forward` on prepared views (B, 3, H, W), the query already through SAIB."""
        raise NotImplementedError

    def encoders(self) -> dict[str, nn.Module]:
        """The encoders by role: "online" (trained by backprop) and, where the
        method has one, "target" (its momentum copy). Profiling times each."""
        raise NotImplementedError

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

    def momentum_update(self, progress: float, finite: torch.Tensor | None = None) -> None:
        """Update momentum (target) networks; `progress` in [0, 1] is the training fraction.
        `finite` (a device bool, or None for always): make the update only where it is
        true, with no host sync (`model.encoder.ema_update`). Methods without a momentum
        network leave this as a no-op."""

    def backbone(self) -> nn.Module:
        """The backbone that evaluation (kNN, linear probe) uses."""
        raise NotImplementedError

    def compile_encoders(self, cache_dir: str = "", **options) -> None:
        """`torch.compile` every encoder's trunk (model/encoder.py: everything
        after the stem convolution, on spectral-normalised weights computed
        outside the graph), one graph per encoder and grad mode. `options`:
        torch.compile's (backend, mode); `cache_dir`: where its on-disk caches
        live ("" -> torch's own place; `model.encoder.use_compile_cache`).
        State_dict keys stay the same; the encoder module itself stays eager,
        so hooks on it (profiling's marks) run outside the compiled graphs."""
        if cache_dir:
            use_compile_cache(cache_dir)
        for encoder in self.encoders().values():
            encoder.compile(**options)


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
