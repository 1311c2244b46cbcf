"""Method registry: `method.name` in the config picks a class here."""

from __future__ import annotations

from model.methods.base import Method
from model.methods.byol import BYOL
from model.methods.iecl import IECL
from model.methods.mocov2 import MoCoV2
from model.methods.simclr import SimCLR
from model.methods.simsiam import SimSiam

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (IECL, MoCoV2, SimCLR, BYOL, SimSiam)}


def build_method(name: str, **kwargs) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](**kwargs)
