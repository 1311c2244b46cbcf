"""Method registry: `method.name` in the config picks a class here."""

from __future__ import annotations

from iecl.model.methods.base import Method
from iecl.model.methods.byol import BYOL
from iecl.model.methods.iecl import IECL
from iecl.model.methods.mocov2 import MoCoV2
from iecl.model.methods.simclr import SimCLR
from iecl.model.methods.simsiam import SimSiam

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (IECL, MoCoV2, SimCLR, BYOL, SimSiam)}


def build_method(name: str, **kwargs) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](**kwargs)
