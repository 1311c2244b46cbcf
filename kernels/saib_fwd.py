"""SAIB forward on Triton kernels (the reference is `kernels/saib_reference.py`).

The block is four convolutions over patch-images whose *channels are the
batch*. Written as matrices in patch order (`kernels/saib_passes.py`), every
activation is (R, C) with R = N p p rows and C = D = B or 2D channels:

    P  = X + pos                                   one pass (uint8 normalisation fused)
    z1 = P @ W1^T                 + BN1 sums       TMA + wgmma GEMM (`kernels/saib_gemm.py`)
    h1 = silu(bn1(z1)), framed                     one pass: 3 column-shifted copies
    z2 = sum_taps h1_tap @ W2_tap^T + BN2 sums     9 accumulating dots over shifted boxes
    h2 = silu(bn2(z2))                             one pass
    z3 = h2 @ W3^T                + BN3 sums
    h3 = h2 + silu(bn3(z3))                        one pass
    z4 = h3 @ W4^T                + BN4 sums
    out = X + (P + bn4(z4))                        one pass, written channels-last

Each GEMM's epilogue stores z and, per row tile, the per-channel sum and
centred sum of squares; `bn_statistics` combines them (Chan) into mean and
1/std and updates the running buffers. Weights are cast once per call to the
compute dtype, K-contiguous, one (C_out, C_in) matrix per tap. The forward
keeps P, h1 (framed), h2, h3 and z1..z4 for the backward, which then needs no
recomputation.
"""

from __future__ import annotations

import torch

from iecl.kernels.saib_gemm import EPI_PLAIN, EPI_STATS, gemm
from iecl.kernels.saib_passes import (
    VIEW_ROUND,
    Geometry,
    activation,
    bn_statistics,
    image_strides,
    output,
    padded,
    patches,
)


def tap_matrices(weight: torch.Tensor, dtype: torch.dtype, transpose: bool = False) -> torch.Tensor:
    """A convolution weight (O, I, k, k) as (k*k * O', I') with tap t = (ky, kx)
    in rows [t O', (t+1) O'), channels zero-padded to `padded`; transpose: the
    weight of the transposed convolution, (k*k * I', O')."""
    o, i, kh, kw = weight.shape
    taps = weight.permute(2, 3, 1, 0) if transpose else weight.permute(2, 3, 0, 1)  # (kh, kw, rows, cols)
    rows, cols = (i, o) if transpose else (o, i)
    out = torch.zeros((kh * kw, padded(rows), padded(cols)), device=weight.device, dtype=dtype)
    out[:, :rows, :cols] = taps.reshape(kh * kw, rows, cols)
    return out.view(kh * kw * padded(rows), padded(cols))


def saib_forward(x, norm, pos, weights, gammas, betas, running_means, running_vars, *,
                 patch: int, training: bool, momentum: float, eps: float,
                 dtype: torch.dtype, out_dtype: torch.dtype, view_dtype: torch.dtype | None = None):
    """Run SAIB forward. `x`: float (B, 3, H, W), or uint8 (B, H, W, 3) with
    `norm` = (mean, std) and `view_dtype`. `dtype`: the GEMMs' operand and
    activation dtype. Returns (out, acts, zs, stats, geo): acts = (P, h1 framed,
    h2, h3), zs = z1..z4, stats = 4 x (mean, rstd) used for normalisation
    (batch statistics when training or when there are no running buffers)."""
    uint8 = x.dtype == torch.uint8
    if uint8:
        b, h, w, _ = x.shape
    else:
        b, _, h, w = x.shape
    geo = Geometry(b, h, w, patch, uint8, VIEW_ROUND[view_dtype] if uint8 else 0)
    batch_stats = training or running_means is None
    update = training and running_means is not None
    epi = EPI_STATS if batch_stats else EPI_PLAIN
    x_strides = image_strides(x, uint8)
    pos = pos.reshape(-1)  # (N, 1, p, p): patch order
    zs, stats = [], []

    def conv(layer: int, a, **kwargs):
        z, partials = gemm(a, tap_matrices(weights[layer], dtype), geo.rows, geo, epi=epi, **kwargs)
        channels = weights[layer].shape[0]
        if batch_stats:
            mean, rstd = bn_statistics(partials, geo.rows, channels, eps, momentum,
                                       running_means[layer] if update else None,
                                       running_vars[layer] if update else None)
        else:
            mean = running_means[layer].float()
            rstd = torch.rsqrt(running_vars[layer].float() + eps)
        zs.append(z)
        stats.append((mean, rstd))
        return z, (mean, rstd, gammas[layer], betas[layer])

    d = b
    p_mat = patches(x, x_strides, norm, pos, geo, dtype)
    z1, bn1 = conv(0, p_mat)
    h1 = activation(z1, bn1, d, geo, framed=True)
    z2, bn2 = conv(1, h1, taps=9, framed=True)
    h2 = activation(z2, bn2, 2 * d, geo)
    z3, bn3 = conv(2, h2)
    h3 = activation(z3, bn3, 2 * d, geo, res=h2)
    z4, bn4 = conv(3, h3)
    out = output(x, x_strides, norm, pos, z4, bn4, geo, out_dtype)
    return out, (p_mat, h1, h2, h3), zs, stats, geo
