"""SAIB backward on Triton kernels (forward and notation: `kernels/saib_fwd.py`).

Training-mode BatchNorm's backward needs, per channel, two sums over all rows
before any input gradient is known:

    dy    = dh * silu'(y)              (layer 4: dy = the output's gradient g)
    dbeta = sum_r dy,   dgamma = sum_r dy * xhat
    dz    = gamma * rstd * (dy - dbeta / R - xhat * dgamma / R)

The sums of each layer come from the epilogue of the GEMM that produces its dh
(layer 4's from one pass over g, read as an image); dz is then one pass,
stored once (framed for the 3x3, whose transposed convolution reads it with
mirrored taps), and read by two GEMMs: dgrad (dh of the layer below = dz @ W)
and wgrad (dW = dz^T @ A, split over rows into fp32 partials, summed in a
fixed order: no atomics). The forward kept every GEMM input A (P, h1 framed,
h2, h3), so nothing is recomputed per tile.

Order: sums4 | dz4 | dW4, dh3 + sums3 | dz3 | dW3, dh2 = dh3 + dz3 @ W3 + sums2 |
dz2 (framed) | dW2, dh1 + sums1 | dz1 | dW1, dQ = dz1 @ W1 | dP = g + dQ,
dX = g + dP, dpos = sum_b dP. The output's gradient g is never laid out as a
matrix: the passes that need it read the image.
"""

from __future__ import annotations

import torch

from iecl.kernels.saib_fwd import tap_matrices
from iecl.kernels.saib_gemm import EPI_GRAD, EPI_PLAIN, gemm, wgrad
from iecl.kernels.saib_passes import dz, grad_in, grad_out, grad_sums


def _weight_grad(dw: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(taps, O', I') fp32 partial sums -> the weight's shape (O, I, k, k)."""
    o, i, kh, kw = weight.shape
    return dw[:, :o, :i].reshape(kh, kw, o, i).permute(2, 3, 0, 1).contiguous()


def saib_backward(g, acts, weights, gammas, betas, zs, stats, geo, *,
                  training: bool, dtype: torch.dtype, needs_input_grad: bool, input_dtype: torch.dtype):
    """Gradients of SAIB from the output's gradient `g`: (dx or None, dpos (R,) fp32, 4 x dW, 4 x dgamma, 4 x dbeta).
    `acts`, `zs`, `stats`, `geo`: what `saib_forward` returned; `training`:
    whether the forward normalised with batch statistics."""
    p_mat, h1, h2, h3 = acts
    z1, z2, z3, z4 = zs
    bn = [(mean, rstd, gamma, beta) for (mean, rstd), gamma, beta in zip(stats, gammas, betas)]
    d, rows = geo.batch, geo.rows
    common = {"geo": geo, "training": training, "dtype": dtype}

    def dgrad(dz_mat, layer: int, below: int | None, **kwargs):
        """dh of the layer below (and its sums) through `layer`'s weight."""
        weight = tap_matrices(weights[layer], dtype, transpose=True)
        if below is None:
            return gemm(dz_mat, weight, rows, geo, epi=EPI_PLAIN, **kwargs)[0]
        channels = weights[below].shape[0]
        dh, partials = gemm(dz_mat, weight, rows, geo, epi=EPI_GRAD, below=(zs[below], *bn[below]),
                            n_real=channels, **kwargs)
        return dh, grad_sums(partials[0], partials[1], channels)

    sums4 = grad_in(g, z4, stats[3][0], stats[3][1], geo)
    dz4 = dz(g, z4, bn[3], sums4, d, act=False, **common)
    dw4 = wgrad(dz4, h3, rows, geo)
    dh3, sums3 = dgrad(dz4, 3, 2)
    dz3 = dz(dh3, z3, bn[2], sums3, 2 * d, act=True, **common)
    dw3 = wgrad(dz3, h2, rows, geo)
    dh2, sums2 = dgrad(dz3, 2, 1, res=dh3)  # h3 = h2 + silu(bn3(z3)): the skip adds dh3
    dz2 = dz(dh2, z2, bn[1], sums2, 2 * d, act=True, framed=True, **common)
    dw2 = wgrad(dz2, h1, rows, geo, taps=9, dz_framed=True, a_framed=True)
    dh1, sums1 = dgrad(dz2, 1, 0, taps=9, framed=True, mirror=True)
    dz1 = dz(dh1, z1, bn[0], sums1, d, act=True, **common)
    dw1 = wgrad(dz1, p_mat, rows, geo)
    dq = dgrad(dz1, 0, None, out_dtype=torch.float32)
    dx, dpos = grad_out(g, dq, geo, input_dtype, needs_input_grad)
    sums = (sums1, sums2, sums3, sums4)
    dws = tuple(_weight_grad(dw, w) for dw, w in zip((dw1, dw2, dw3, dw4), weights))
    return dx, dpos, dws, tuple(s[1] for s in sums), tuple(s[0] for s in sums)
