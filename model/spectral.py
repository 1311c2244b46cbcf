"""Spectral normalisation computed outside the encoders' graphs, once per step.

The backbones keep PyTorch's spectral-norm parametrisation
(`torch.nn.utils.parametrizations.spectral_norm`): it holds the trained
weight (`weight.original`) and the power-iteration vectors (`_u`, `_v`), so
state_dict keys, checkpoints, `plain_state_dict` and export are unchanged.
What changes is who runs it. `normalised_weights` computes W / sigma for every
convolution (one power iteration in training mode, with gradient to
`weight.original` through sigma), and the encoder (model/encoder.py) runs a
plain copy of its network on those tensors. The parametrisation code never
enters a compiled graph, and online and target encoders run the same plain
graph definition.

Two ways to compute them (`model.spectral_batched`):

    loop      each convolution's own parametrisation, called once (PyTorch's
              code: the numbers of the parametrised module, bit for bit)
    batched   one power iteration for all convolutions at once: the weights
              grouped by shape and memory format, each group stacked and
              iterated with `bmm` (`_batched_group`), the new u and v written
              back into every `_u`/`_v` with one `torch._foreach_copy_`. The
              same arithmetic as `_SpectralNorm` (same eps, order and
              iteration count; sigma = u . (W v), gradient through sigma);
              only the summation order of the products differs (W / sigma,
              gradients, u and v within ~2e-6 of their largest entry in
              fp32, tests/test_spectral.py)

Kernel launches per call of one ResNet-50 encoder (53 convolutions, 20 shape
groups; counted as aten ops on the CPU, which are the kernels a GPU
launches, by tests/test_spectral.py's counter on a channels-last model):

                          loop    batched
    training forward       706     291
    its backward           494     200
    eval forward           282     125

A training step runs the online encoder's forward and backward and the
target's forward (in training mode: it iterates too): 1,906 launches with the
loop, 782 batched. At 4-6 us per launch (these kernels are tiny: the three
matrix-vector passes over ResNet-50's 94 MB of weights take ~60 us of
bandwidth in all), the prediction is 4.5-6.7 ms less per step on a GPU, about
2-3% of the 214 ms eager H100 step, whatever the batch size; less where the
host's launches hide behind queued GPU work. To be measured with `iecl
profile ... model.spectral_batched=false` against the default (the counts:
`tests/test_spectral.py`'s `launch_counts`).

The cost: stacking copies every weight once per call (ResNet-50: 23.5 M conv
weights, 94 MB in fp32, read and written once: ~40 us at H100/H200
bandwidth), and the backward stacks the incoming gradients once more (94 MB);
for the online encoder the weight stacks stay alive until the backward (94 MB
more memory at the peak; the loop's flatten of a channels-last 3x3 or 7x7
weight copies too, conv by conv, 17 of them). The
channels-last weights are stacked in their own memory order (the matrix
W[o, (kh, kw, i)] and v permuted to match), so no weight is copied twice and
each W / sigma comes out channels-last, as the convolution wants it.

Both run with autocast off: the power iteration and sigma in the weights'
dtype (fp32), as the parametrised module computes them outside autocast
(under CUDA autocast, `torch.mv` would otherwise run in bf16, and sigma
would carry bf16's 3 digits into every weight).

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
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

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


def normalised_weights(module: nn.Module, prefix: str = "", batched: bool = True) -> dict[str, torch.Tensor]:
    """`{prefix}{conv}.weight` -> W / sigma for every spectral-normalised
    convolution under `module`, each power iteration run once (in training
    mode, updating `_u`, `_v` in place): all at once if `batched`, else each
    convolution's own parametrisation in turn."""
    convs = parametrized_convs(module)
    if not convs:
        return {}
    out = {}
    with torch.autocast(convs[0][1].parametrizations.weight.original.device.type, enabled=False):
        if batched:
            out.update(_batched(convs, prefix))
        for name, conv in convs:
            if f"{prefix}{name}.weight" not in out:  # the loop, or a weight the batched path does not take
                out[f"{prefix}{name}.weight"] = _own_parametrisation(conv)
    return out


def _own_parametrisation(conv: nn.Module) -> torch.Tensor:
    chain = conv.parametrizations.weight
    weight = chain.original
    for p in chain:  # the chain PyTorch's property would run (spectral norm: one link)
        weight = p(weight)
    return weight


def _batchable(conv: nn.Module) -> bool:
    """A conv weight whose one parametrisation is PyTorch's spectral norm along dim 0."""
    chain = conv.parametrizations.weight
    return len(chain) == 1 and type(chain[0]) is _SpectralNorm and chain[0].dim == 0 and chain.original.ndim == 4


def is_channels_last(t: torch.Tensor) -> bool:
    """Laid out channels-last and not also plain contiguous (a 1x1 kernel is both)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _batched(convs: list[tuple[str, nn.Module]], prefix: str) -> dict[str, torch.Tensor]:
    """W / sigma for every batchable conv: one stacked power iteration per group
    of equal shape, layout, dtype and settings; then every `_u`/`_v` updated at once."""
    groups: dict[tuple, list[tuple[str, _SpectralNorm, torch.Tensor]]] = {}
    for name, conv in convs:
        if _batchable(conv):
            sn, weight = conv.parametrizations.weight[0], conv.parametrizations.weight.original
            key = (weight.shape, is_channels_last(weight), weight.dtype, weight.device, sn.eps,
                   sn.n_power_iterations, sn.training)
            groups.setdefault(key, []).append((f"{prefix}{name}.weight", sn, weight))
    out, buffers, values = {}, [], []
    for (_, channels_last, *_), members in groups.items():
        names, modules, weights = zip(*members)
        normalised, new_vectors = _batched_group(modules, weights, channels_last)
        out.update(zip(names, normalised))
        if new_vectors is not None:
            buffers += [m._u for m in modules] + [m._v for m in modules]
            values += [*new_vectors[0].unbind(0), *new_vectors[1].unbind(0)]
    if buffers:
        with torch.no_grad():  # in place, as `_SpectralNorm._power_method` does (DataParallel relies on it)
            torch._foreach_copy_(buffers, values)
    return out


def _batched_group(modules, weights, channels_last: bool):
    """One group's W / sigma (k tensors in the weights' layout) and, in training
    mode, the new (u, v) stacks (k, h) and (k, w) in PyTorch's order, not yet written.

    The matrix is W.flatten(1) (`_SpectralNorm._reshape_weight_to_matrix`, dim
    0), taken in the weights' memory order: a channels-last weight is the view
    W.permute(0, 2, 3, 1), columns (kh, kw, i), and v is permuted to match
    (M P and P^T v: the same u, sigma and, permuted back, v)."""
    sn, k = modules[0], len(weights)
    stacked = torch.stack([w.permute(0, 2, 3, 1) if channels_last else w for w in weights])  # the one copy
    matrix = stacked.flatten(2)  # (k, h, w), a view
    with torch.no_grad():
        u = torch.stack([m._u for m in modules])
        v = _to_memory_order(torch.stack([m._v for m in modules]), weights[0].shape, channels_last)
        new = None
        if sn.training:
            m = matrix.detach()
            for _ in range(sn.n_power_iterations):  # _SpectralNorm._power_method, k at a time
                u = F.normalize(torch.bmm(m, v.unsqueeze(2)).squeeze(2), dim=1, eps=sn.eps)
                v = F.normalize(torch.bmm(m.mT, u.unsqueeze(2)).squeeze(2), dim=1, eps=sn.eps)
            new = (u, _to_pytorch_order(v, weights[0].shape, channels_last))
    sigma = torch.bmm(u.unsqueeze(1), torch.bmm(matrix, v.unsqueeze(2)))  # (k, 1, 1): u . (W v), grad to W
    normalised = stacked / sigma.view(k, 1, 1, 1, 1)
    return [n.permute(0, 3, 1, 2) if channels_last else n for n in normalised.unbind(0)], new


def _to_memory_order(v: torch.Tensor, shape: torch.Size, channels_last: bool) -> torch.Tensor:
    """(k, i*kh*kw) in PyTorch's column order -> the order of the stacked matrix."""
    if not channels_last:
        return v
    _, i, kh, kw = shape
    return v.view(-1, i, kh, kw).permute(0, 2, 3, 1).reshape(v.shape)


def _to_pytorch_order(v: torch.Tensor, shape: torch.Size, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return v
    _, i, kh, kw = shape
    return v.view(-1, kh, kw, i).permute(0, 3, 1, 2).reshape(v.shape)


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
