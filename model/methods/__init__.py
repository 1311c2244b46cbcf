"""The methods. Each registers itself (registry.py) where it is defined;
importing this package imports them all, so `METHODS` is complete."""

from __future__ import annotations

import dataclasses

from iecl.model.methods.base import Method, Parts
from iecl.model.methods.registry import METHODS
from iecl.model.resnet import build_backbone
from iecl.model.saib import SAIB

# isort: off
# Each module registers its method as it is imported: the registry's order (the
# order reports list methods in) is IE-CL, then its baselines in their papers' order.
from iecl.model.methods.iecl import IECL
from iecl.model.methods.mocov2 import MoCoV2
from iecl.model.methods.simclr import SimCLR
from iecl.model.methods.byol import BYOL
from iecl.model.methods.simsiam import SimSiam
# isort: on


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def build_method(name: str, *, backbone: str = "resnet50", spectral_norm: bool | None = None,
                 projector_hidden: int = 2048, projector_out: int = 128, batch_size: int = 256,
                 image_size: int = 224, saib: bool = False, patch_size: int = 16, saib_weight_decay: float = 1e-4,
                 saib_impl: str = "reference", **hyper) -> Method:
    """Method `name` from its shared parts and its own hyperparameters
    (`hyper`: fields of its `Hyper`, the rest keep its paper's defaults)."""
    cls = method_class(name)
    known = {f.name for f in dataclasses.fields(cls.Hyper)}
    if set(hyper) - known:
        raise TypeError(f"{name} takes no {sorted(set(hyper) - known)}; its hyperparameters are {sorted(known)}")
    trunk = build_backbone(backbone, cls.spectral_norm if spectral_norm is None else spectral_norm)
    method = cls(Parts(trunk, projector_hidden, projector_out), cls.Hyper(**hyper))
    if saib:
        method.attach_saib(SAIB(batch_size, (image_size, image_size), patch_size, impl=saib_impl), saib_weight_decay)
    return method


__all__ = ["BYOL", "IECL", "METHODS", "Method", "MoCoV2", "Parts", "SimCLR", "SimSiam", "build_method", "method_class"]
