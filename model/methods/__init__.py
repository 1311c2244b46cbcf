"""Method registry: `method.name` in the config picks a class here."""

from __future__ import annotations

from model.methods.base import Method
from model.methods.iecl import IECL

METHODS: dict[str, type[Method]] = {IECL.name: IECL}


def build_method(name: str, **kwargs) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](**kwargs)
