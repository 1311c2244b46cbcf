"""The method registry: each method registers itself where it is defined
(`@register`), and `method.name` in the config names it. The config checks
names against this dict, and `iecl compare` iterates it: adding a method is
its file (plus an import in model/methods/__init__.py) and a YAML."""

from __future__ import annotations

METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls
