"""SAIB's Triton path as a `torch.autograd.Function`, and the functions with
the reference's signatures (`kernels/saib_reference.py`) that call it.

Forward saves the parameters, every GEMM input (P, h1 framed, h2, h3) and the
four pre-BN activations z1..z4 as patch-order matrices in the compute dtype,
and the per-channel mean and 1/std; backward recomputes nothing per tile.
Parameter gradients are fp32, the input's gradient has the input's dtype.

Dtypes: the GEMMs run in the autocast dtype when autocast is on for the
input's device, else in the parameters' dtype (fp32); the output has that
dtype. (The reference under autocast returns fp32, because its fp32
pos_embed promotes the sum; the encoder casts its input either way, and bf16
halves what SAIB writes.)
"""

from __future__ import annotations

import torch

from iecl.kernels.saib_bwd import saib_backward
from iecl.kernels.saib_fwd import saib_forward
from iecl.kernels.saib_reference import SAIBParams


class _Config:
    def __init__(self, patch, training, momentum, eps, dtype, view_dtype, running_means, running_vars):
        self.patch, self.training, self.momentum, self.eps = patch, training, momentum, eps
        self.dtype, self.view_dtype = dtype, view_dtype
        self.running_means, self.running_vars = running_means, running_vars


class SAIBFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_mean, norm_std, pos, w1, w2, w3, w4, g1, g2, g3, g4, b1, b2, b3, b4, config):
        weights, gammas, betas = (w1, w2, w3, w4), (g1, g2, g3, g4), (b1, b2, b3, b4)
        norm = (norm_mean, norm_std) if x.dtype == torch.uint8 else None
        out, acts, zs, stats, geo = saib_forward(
            x, norm, pos, weights, gammas, betas, config.running_means, config.running_vars,
            patch=config.patch, training=config.training, momentum=config.momentum, eps=config.eps,
            dtype=config.dtype, out_dtype=config.dtype, view_dtype=config.view_dtype)
        means, rstds = zip(*stats)
        ctx.save_for_backward(*weights, *gammas, *betas, *acts, *zs, *means, *rstds)
        ctx.geo = geo
        ctx.batch_stats = config.training or config.running_means is None
        ctx.dtype = config.dtype
        ctx.input_dtype, ctx.pos_shape, ctx.pos_dtype = x.dtype, pos.shape, pos.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        weights, gammas, betas, acts, zs = saved[0:4], saved[4:8], saved[8:12], saved[12:16], saved[16:20]
        stats = list(zip(saved[20:24], saved[24:28]))
        dx, dpos, dws, dgammas, dbetas = saib_backward(
            grad_out, acts, weights, gammas, betas, zs, stats, ctx.geo, training=ctx.batch_stats,
            dtype=ctx.dtype, needs_input_grad=ctx.needs_input_grad[0], input_dtype=ctx.input_dtype)
        dpos = dpos.view(ctx.pos_shape).to(ctx.pos_dtype)
        return (dx, None, None, dpos, *dws, *dgammas, *dbetas, None)


def _compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


def _apply(x, norm_mean, norm_std, view_dtype, params: SAIBParams, patch, training, momentum, eps):
    dtype = _compute_dtype(x.device, params.conv_weights[0].dtype)
    if training and params.num_batches_tracked is not None:
        for count in params.num_batches_tracked:
            count.add_(1)
    config = _Config(patch, training, momentum, eps, dtype, view_dtype, params.running_means, params.running_vars)
    return SAIBFunction.apply(x, norm_mean, norm_std, params.pos_embed.contiguous(), *params.conv_weights,
                              *params.bn_weights, *params.bn_biases, config)


def _check_geometry(batch: int, channels: int, height: int, width: int, params: SAIBParams, patch: int) -> None:
    assert channels == 3 and height % patch == 0 and width % patch == 0, ((batch, channels, height, width), patch)
    if patch % 4:  # a GEMM row tile (>= 16 rows, tl.dot's smallest) must not cross a patch
        raise ValueError(f"the Triton SAIB needs a patch size that is a multiple of 4, got {patch}; "
                         "use kernels.saib_impl=reference")
    assert params.conv_weights[0].shape[0] == batch, "SAIB's channels are the batch"


def saib_triton(
    x: torch.Tensor,
    params: SAIBParams,
    patch: int,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """SAIB forward on the Triton kernels; the arguments of `saib_reference`."""
    if not x.is_floating_point() or x.ndim != 4:
        raise ValueError(f"expected a float (B, 3, H, W) batch, got {x.dtype} {tuple(x.shape)}")
    _check_geometry(*x.shape, params, patch)
    return _apply(x, None, None, None, params, patch, training, momentum, eps)


def saib_triton_uint8(
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
    """SAIB on a uint8 (B, H, W, 3) view with the normalisation fused into the
    first GEMM's loads; the arguments of `saib_reference_uint8`."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (B, H, W, C) views, got {images.dtype} {tuple(images.shape)}")
    b, h, w, c = images.shape
    _check_geometry(b, c, h, w, params, patch)
    mean = mean.to(device=images.device, dtype=torch.float32).contiguous()
    std = std.to(device=images.device, dtype=torch.float32).contiguous()
    return _apply(images, mean, std, dtype, params, patch, training, momentum, eps)
