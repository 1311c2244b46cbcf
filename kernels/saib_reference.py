"""SAIB as a pure-PyTorch function: the reference the Triton kernels are
checked against, and what `torch.compile` compiles (`impl="compile"`).

It is SAIB's one reference: `model/saib.py::SAIB` holds the parameters and
BatchNorm buffers and calls this function on them (impl="reference"), or its
compiled form (impl="compile"). The Triton version (`kernels/saib_function.py::
saib_triton`) takes exactly the same arguments.

Shapes: `x` is the query batch (B, 3, H, W); patch-images are
(N, B, p, p) with N = 3 * (H/p) * (W/p): the batch B is the convolutions'
channel dimension D, the N patch-images their batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from iecl.kernels.view_prep import prepare_view_reference


class SAIBParams(NamedTuple):
    """SAIB's parameters and BatchNorm buffers, in forward order (layers 1-4:
    1x1 D->D, 3x3 D->2D, 1x1 2D->2D, 1x1 2D->D)."""

    pos_embed: torch.Tensor  # (N, 1, p, p)
    conv_weights: tuple[torch.Tensor, ...]  # 4 x (C_out, C_in, k, k), no bias
    bn_weights: tuple[torch.Tensor, ...]  # 4 x (C_out,)
    bn_biases: tuple[torch.Tensor, ...]  # 4 x (C_out,)
    running_means: tuple[torch.Tensor, ...] | None = None  # updated in place in training
    running_vars: tuple[torch.Tensor, ...] | None = None
    num_batches_tracked: tuple[torch.Tensor, ...] | None = None


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> patch-images (C*H/p*W/p, B, p, p); batch becomes channels."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    x = x.permute(1, 2, 4, 0, 3, 5)  # (C, H/p, W/p, B, p, p)
    return x.reshape(c * (h // patch) * (w // patch), b, patch, patch)


def unpatchify(p: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `patchify`: (N, B, p, p) -> (B, C, H, W)."""
    _, b, patch, _ = p.shape
    x = p.reshape(channels, height // patch, width // patch, b, patch, patch)
    x = x.permute(3, 0, 1, 4, 2, 5)  # (B, C, H/p, p, W/p, p)
    return x.reshape(b, channels, height, width)


def _conv_bn(h: torch.Tensor, params: SAIBParams, layer: int, training: bool, momentum: float, eps: float):
    weight = params.conv_weights[layer]
    h = F.conv2d(h, weight, None, 1, weight.shape[-1] // 2)
    running_mean = params.running_means[layer] if params.running_means is not None else None
    running_var = params.running_vars[layer] if params.running_vars is not None else None
    if training and params.num_batches_tracked is not None:
        params.num_batches_tracked[layer].add_(1)
    # As nn.BatchNorm2d: batch statistics when training or when there are no buffers.
    use_batch_stats = training or running_mean is None
    return F.batch_norm(h, running_mean, running_var, params.bn_weights[layer], params.bn_biases[layer],
                        use_batch_stats, momentum, eps)


def saib_reference(
    x: torch.Tensor,
    params: SAIBParams,
    patch: int,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """SAIB forward: float (B, 3, H, W) -> (B, 3, H, W) channels-last.

    In training the batch statistics normalise and the running buffers (if in
    `params`) are updated as nn.BatchNorm2d does; otherwise the running buffers
    normalise.
    """
    _, c, h, w = x.shape
    patches = patchify(x, patch) + params.pos_embed  # (N, B, p, p)
    h1 = F.silu(_conv_bn(patches, params, 0, training, momentum, eps))
    h2 = F.silu(_conv_bn(h1, params, 1, training, momentum, eps))  # zero padding 1 inside each patch
    h3 = h2 + F.silu(_conv_bn(h2, params, 2, training, momentum, eps))
    patches = patches + _conv_bn(h3, params, 3, training, momentum, eps)
    out = x + unpatchify(patches, c, h, w)
    return out.contiguous(memory_format=torch.channels_last)


def saib_reference_uint8(
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    dtype: torch.dtype,
    params: SAIBParams,
    patch: int,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """SAIB on a uint8 (B, H, W, 3) query view: `prepare_view_reference` (normalise,
    cast to `dtype`, channels-last) and then `saib_reference`."""
    return saib_reference(prepare_view_reference(images, mean, std, dtype), params, patch, training, momentum, eps)


_compiled = None


def compiled_saib_reference():
    """`torch.compile(saib_reference)`, compiled once per process (recompiled by
    dynamo's guards per shape and training flag)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(saib_reference)
    return _compiled
