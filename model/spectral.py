"""Spectral normalisation computed outside the encoders' graphs, once per step.

The backbones keep PyTorch's spectral-norm parametrisation
(`torch.nn.utils.parametrizations.spectral_norm`): it holds the trained
weight (`weight.original`) and the power-iteration vectors (`_u`, `_v`), so
state_dict keys, checkpoints, `plain_state_dict` and export are unchanged.
What changes is who runs it: `normalised_weights` calls each convolution's
parametrisation once (one power iteration in training mode, then W / sigma,
with gradient to `weight.original` through sigma: PyTorch's own code, so the
numbers are those of the parametrised module), and the encoder
(model/encoder.py) runs a plain copy of its network on those tensors. The
parametrisation code never enters a compiled graph, and online and target
encoders run the same plain graph definition.

`once_per_step()` is the step's scope: within it each encoder's normalised
weights are computed the first time it runs and reused by every later call
(both views see the same weights, and the power iteration runs once per
step). Outside it, every call computes them afresh, as an uncached
parametrisation does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

_scopes: list[dict[int, dict[str, torch.Tensor]]] = []  # open `once_per_step` scopes, innermost last


@contextmanager
def once_per_step() -> Iterator[None]:
    """Each encoder's normalised weights at most once within this scope."""
    _scopes.append({})
    try:
        yield
    finally:
        _scopes.pop()


def step_cache() -> dict[int, dict[str, torch.Tensor]] | None:
    """The innermost open scope's cache (encoder id -> tensors), None outside any."""
    return _scopes[-1] if _scopes else None


def parametrized_convs(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every spectral-normalised weight under `module`."""
    return [(name, m) for name, m in module.named_modules() if parametrize.is_parametrized(m, "weight")]


def normalised_weights(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """`{prefix}{conv}.weight` -> W / sigma for every spectral-normalised
    convolution under `module`: each parametrisation run once on its
    `original` (in training mode one power iteration, updating `_u`, `_v`)."""
    out = {}
    for name, conv in parametrized_convs(module):
        chain = conv.parametrizations.weight
        weight = chain.original
        for p in chain:  # the chain PyTorch's property would run (spectral norm: one link)
            weight = p(weight)
        out[f"{prefix}{name}.weight"] = weight
    return out


def plain_skeleton(module: nn.Module) -> nn.Module:
    """A copy of `module` on the meta device (no memory) with every
    parametrised convolution replaced by a plain one: the network that
    `torch.func.functional_call` runs on `normalised_weights` and the other
    parameters and buffers. Built from the module as it is (after SyncBatchNorm
    conversion, say), so it computes what the module computes."""
    skeleton = _meta_copy(module)
    for name, conv in parametrized_convs(skeleton):
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                          device="meta")
        parent, _, leaf = name.rpartition(".")
        setattr(skeleton.get_submodule(parent) if parent else skeleton, leaf, plain)
    return skeleton


def _meta_copy(module: nn.Module) -> nn.Module:
    import copy

    # Deep-copy the structure with every tensor already on the meta device, so no
    # second copy of the weights is ever allocated.
    memo = {id(t): torch.empty_like(t, device="meta") for t in list(module.parameters()) + list(module.buffers())}
    for t in list(module.parameters()):
        memo[id(t)] = nn.Parameter(memo[id(t)], requires_grad=t.requires_grad)
    return copy.deepcopy(module, memo)
