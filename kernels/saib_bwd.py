"""SAIB backward as Triton kernels (forward and notation: `kernels/saib_fwd.py`).

Training-mode BatchNorm's backward needs, per channel, two sums over all rows
before any input gradient is known:

    dy    = dh * silu'(y)              (layer 4: dy = the output's gradient g)
    dbeta = sum_r dy,   dgamma = sum_r dy * xhat
    dz    = gamma * rstd * (dy - dbeta / R - xhat * dgamma / R)

So each layer's dz is an elementwise function of (dh, z) and those two sums,
and is computed on the fly, never stored: in the prologue of the GEMM that
propagates it (`saib_gemm_dgrad_kernel`: dh_prev = dz @ W; for the 3x3 an
implicit GEMM over the 9 taps with mirrored shifts) and of the GEMM that makes
the weight gradient (`saib_gemm_wgrad_kernel`: dW = dz^T @ A, split over rows,
fp32 atomics). The next layer down's sums are taken in the dgrad epilogue,
which has dh_prev in registers (per row tile, combined by
`sum_partials_kernel`); only layer 4's come from a separate pass over g. The
forward activations the weight gradients need (P, h1, h2, h3) are recomputed
from the saved pre-BN z's by the forward's own prologue (`_act_tile`). The last
dgrad epilogue forms dP = g + dz1 @ W1, the input's gradient dX = g + dP (both
outer skips) and pos_embed's, the sum of dP over the batch.

Order: sums4 | dW4, dh3 (+ sums3) | dW3, dh2 = dh3 + dz3 @ W3 (+ sums2) |
dW2, dh1 (+ sums1) | dW1, dX and dpos.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from iecl.kernels._triton import empty, interpreting
from iecl.kernels.saib_fwd import (
    _act_tile,
    _mma,
    _np2,
    _pos_offsets,
    _row_offsets,
    _rows,
    dot_config,
    gemm_blocks,
    image_strides,
    matrix_strides,
    weight_strides,
)


@triton.jit
def _dz_tile(d_ptr, d_sk, d_sc, d_sy, d_sx, z_ptr, c, y, x, valid, offs_k, K, W,
             mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, sdy_ptr, sdyx_ptr, inv_R,
             ACT: tl.constexpr, TRAINING: tl.constexpr):
    """dz of one layer as an fp32 (rows, K) tile, from the gradient d of its
    output (through Swish if ACT) and its pre-BN z (R, K); zero outside the mask."""
    kmask = offs_k < K
    mask = valid[:, None] & kmask[None, :]
    d_rows = _row_offsets(c, y, x, d_sc, d_sy, d_sx)
    d = tl.load(d_ptr + d_rows[:, None] + offs_k.to(tl.int64)[None, :] * d_sk, mask=mask, other=0.0).to(tl.float32)
    z_rows = _row_offsets(c, y, x, K, 3 * W * K, 3 * K)
    z = tl.load(z_ptr + z_rows[:, None] + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + offs_k, mask=kmask, other=0.0)
    rstd = tl.load(rstd_ptr + offs_k, mask=kmask, other=0.0)
    gamma = tl.load(gamma_ptr + offs_k, mask=kmask, other=0.0)
    xhat = (z - mean[None, :]) * rstd[None, :]
    if ACT:
        beta = tl.load(beta_ptr + offs_k, mask=kmask, other=0.0)
        yv = xhat * gamma[None, :] + beta[None, :]
        sig = tl.sigmoid(yv)
        d = d * (sig * (1.0 + yv * (1.0 - sig)))
    if TRAINING:
        sdy = tl.load(sdy_ptr + offs_k, mask=kmask, other=0.0) * inv_R
        sdyx = tl.load(sdyx_ptr + offs_k, mask=kmask, other=0.0) * inv_R
        d = d - sdy[None, :] - xhat * sdyx[None, :]
    return tl.where(mask, d * (gamma * rstd)[None, :], 0.0)


@triton.jit
def _store_bn_grad_partials(dh, z_ptr, offs_r, rmask, offs_n, N, pid_r,
                            mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, psum_ptr, pdyx_ptr, ACT: tl.constexpr):
    """Per row tile and channel: sum of dy and of dy * xhat, dy = dh (* silu'(y))."""
    nmask = offs_n < N
    mask = rmask[:, None] & nmask[None, :]
    z = tl.load(z_ptr + offs_r.to(tl.int64)[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + offs_n, mask=nmask, other=0.0)
    rstd = tl.load(rstd_ptr + offs_n, mask=nmask, other=0.0)
    xhat = (z - mean[None, :]) * rstd[None, :]
    dy = dh
    if ACT:
        gamma = tl.load(gamma_ptr + offs_n, mask=nmask, other=0.0)
        beta = tl.load(beta_ptr + offs_n, mask=nmask, other=0.0)
        yv = xhat * gamma[None, :] + beta[None, :]
        sig = tl.sigmoid(yv)
        dy = dh * (sig * (1.0 + yv * (1.0 - sig)))
    dy = tl.where(mask, dy, 0.0)
    tl.store(psum_ptr + pid_r * N + offs_n, tl.sum(dy, axis=0), mask=nmask)
    tl.store(pdyx_ptr + pid_r * N + offs_n, tl.sum(dy * xhat, axis=0), mask=nmask)


@triton.jit
def bn_grad_partials_kernel(
    g_ptr, g_sb, g_sc, g_sy, g_sx, z_ptr, mean_ptr, rstd_ptr, psum_ptr, pdyx_ptr,
    R, W, P, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Layer 4's sums (no activation): dy is the output's gradient g itself."""
    pid_r = tl.program_id(0)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c, y, x, valid = _rows(offs_r, R, W, P, 0, 0)
    mask = valid[:, None] & (offs_n < N)[None, :]
    g_offsets = _row_offsets(c, y, x, g_sc, g_sy, g_sx)[:, None] + offs_n.to(tl.int64)[None, :] * g_sb
    g = tl.load(g_ptr + g_offsets, mask=mask, other=0.0).to(tl.float32)
    _store_bn_grad_partials(g, z_ptr, offs_r, valid, offs_n, N, pid_r,
                            mean_ptr, rstd_ptr, mean_ptr, mean_ptr, psum_ptr, pdyx_ptr, False)


@triton.jit
def sum_partials_kernel(pa_ptr, pb_ptr, out_a_ptr, out_b_ptr, T, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum two (T, C) partial buffers over T (fixed order: deterministic)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    total_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    total_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < T)[:, None] & cmask[None, :]
        offsets = offs_t[:, None] * C + offs_c[None, :]
        total_a += tl.sum(tl.load(pa_ptr + offsets, mask=mask, other=0.0), axis=0)
        total_b += tl.sum(tl.load(pb_ptr + offsets, mask=mask, other=0.0), axis=0)
    tl.store(out_a_ptr + offs_c, total_a, mask=cmask)
    tl.store(out_b_ptr + offs_c, total_b, mask=cmask)


@triton.jit
def saib_gemm_dgrad_kernel(
    d_ptr, d_sk, d_sc, d_sy, d_sx,  # gradient of this layer's output: g (image) or dh (R, K)
    z_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, sdy_ptr, sdyx_ptr,  # this layer (K channels)
    w_ptr, w_so, w_si, w_sy, w_sx,  # this layer's weight (K, N, k, k)
    res_ptr,  # (R, N) added to the result (dh3 into dh2)
    out_ptr,  # dh of the layer below (R, N); EPI 1: dX with image strides dx_*
    zn_ptr, n_mean, n_rstd, n_gamma, n_beta, psum_ptr, pdyx_ptr,  # layer below, for its sums (EPI 0)
    g_ptr, g_sb, g_sc, g_sy, g_sx, dx_sb, dx_sc, dx_sy, dx_sx, dpos_ptr,  # EPI 1
    R, W, Hp, Wp, P, K, N, inv_R,
    ACT: tl.constexpr, TRAINING: tl.constexpr, TAPS: tl.constexpr, HAS_RES: tl.constexpr,
    EPI: tl.constexpr, WRITE_DX: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[r, n] = sum_taps sum_k dz[r - shift_t, k] * w[k, n, t]; epilogue EPI 0:
    (+ res), store, next layer's BN-gradient sums; EPI 1: dX, dpos."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for t in tl.static_range(TAPS):
        # The transpose of "tap t reads (y + ky - 1, x + kx - 1)": r receives from r - shift.
        c, y, x, valid = _rows(offs_r, R, W, P, (1 - t // 3) * (TAPS // 9), (1 - t % 3) * (TAPS // 9))
        w_tap = w_ptr + (t // 3) * w_sy + (t % 3) * w_sx
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = _dz_tile(d_ptr, d_sk, d_sc, d_sy, d_sx, z_ptr, c, y, x, valid, offs_k, K, W,
                         mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, sdy_ptr, sdyx_ptr, inv_R, ACT, TRAINING)
            w = tl.load(w_tap + offs_k[:, None] * w_so + offs_n[None, :] * w_si,
                        mask=(offs_k < K)[:, None] & nmask[None, :], other=0.0)
            acc = _mma(a, w, acc, z_ptr, DOT_F32, PREC)
    rmask = offs_r < R
    mask = rmask[:, None] & nmask[None, :]
    if EPI == 0:
        matrix_offsets = offs_r.to(tl.int64)[:, None] * N + offs_n[None, :]
        if HAS_RES:
            acc += tl.load(res_ptr + matrix_offsets, mask=mask, other=0.0).to(tl.float32)
        dh = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + matrix_offsets, dh, mask=mask)
        # The sums of what the next kernels will load: the stored (rounded) dh.
        _store_bn_grad_partials(dh.to(tl.float32), zn_ptr, offs_r, rmask, offs_n, N, pid_r,
                                n_mean, n_rstd, n_gamma, n_beta, psum_ptr, pdyx_ptr, True)
    else:
        c, y, x, valid = _rows(offs_r, R, W, P, 0, 0)
        g_offsets = _row_offsets(c, y, x, g_sc, g_sy, g_sx)[:, None] + offs_n.to(tl.int64)[None, :] * g_sb
        g = tl.load(g_ptr + g_offsets, mask=mask, other=0.0).to(tl.float32)
        d_patches = tl.where(mask, g + acc, 0.0)  # P feeds conv1 and the inner skip
        if WRITE_DX:
            dx_offsets = _row_offsets(c, y, x, dx_sc, dx_sy, dx_sx)[:, None] + offs_n.to(tl.int64)[None, :] * dx_sb
            tl.store(out_ptr + dx_offsets, (g + d_patches).to(out_ptr.dtype.element_ty), mask=mask)
        tl.atomic_add(dpos_ptr + _pos_offsets(c, y, x, Hp, Wp, P), tl.sum(d_patches, axis=1), mask=rmask)


@triton.jit
def saib_gemm_wgrad_kernel(
    d_ptr, d_sk, d_sc, d_sy, d_sx,  # as in the dgrad kernel: this layer's dz (O channels)
    z_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, sdy_ptr, sdyx_ptr,
    a_ptr, a_sk, a_sc, a_sy, a_sx, nmean_ptr, nstd_ptr, pos_ptr,  # this layer's input, as in the forward
    a_mean, a_rstd, a_gamma, a_beta, b_ptr, b_mean, b_rstd, b_gamma, b_beta,
    dw_ptr,  # fp32 (O, I, TAPS), accumulated with atomics
    R, W, Hp, Wp, P, O, I, inv_R, TILES_PER_SPLIT,
    ACT: tl.constexpr, TRAINING: tl.constexpr, A_MODE: tl.constexpr, U8: tl.constexpr,
    VIEW_ROUND: tl.constexpr, TAPS: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dw[o, i, t] += sum_{r in this split} dz[r, o] * A[shift_t(r), i]."""
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    tap = tl.program_id(2) % TAPS
    split = tl.program_id(2) // TAPS
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    dy = (tap // 3 - 1) * (TAPS // 9)
    dx = (tap % 3 - 1) * (TAPS // 9)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    first = split * TILES_PER_SPLIT
    last = tl.minimum(first + TILES_PER_SPLIT, tl.cdiv(R, BLOCK_R))
    for tile in range(first, last):
        offs_r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        c, y, x, valid = _rows(offs_r, R, W, P, 0, 0)
        dz = _dz_tile(d_ptr, d_sk, d_sc, d_sy, d_sx, z_ptr, c, y, x, valid, offs_o, O, W,
                      mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, sdy_ptr, sdyx_ptr, inv_R, ACT, TRAINING)
        cs, ys, xs, shifted_valid = _rows(offs_r, R, W, P, dy, dx)
        a = _act_tile(a_ptr, a_sk, a_sc, a_sy, a_sx, nmean_ptr, nstd_ptr, pos_ptr,
                      a_mean, a_rstd, a_gamma, a_beta, b_ptr, b_mean, b_rstd, b_gamma, b_beta,
                      cs, ys, xs, shifted_valid, offs_i, I, Hp, Wp, P, A_MODE, U8, VIEW_ROUND)
        acc = _mma(tl.trans(dz), a, acc, z_ptr, DOT_F32, PREC)
    mask = (offs_o < O)[:, None] & (offs_i < I)[None, :]
    tl.atomic_add(dw_ptr + offs_o[:, None] * (I * TAPS) + offs_i[None, :] * TAPS + tap, acc, mask=mask)


# ---------------------------------------------------------------- launchers


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _sums(psum, pdyx):
    """(dbeta, dgamma) = per-channel totals of the partial sums."""
    channels = psum.shape[1]
    dbeta = empty(channels, device=psum.device, dtype=torch.float32)
    dgamma = empty(dbeta.shape, device=dbeta.device, dtype=dbeta.dtype)
    block_c = min(128, _np2(channels))
    sum_partials_kernel[(triton.cdiv(channels, block_c),)](
        psum, pdyx, dbeta, dgamma, psum.shape[0], channels, BLOCK_T=64, BLOCK_C=block_c)
    return dbeta, dgamma


class _Layer:
    """What the kernels need about one layer: its pre-BN z, BN params and stats,
    and (once known) its BN-gradient sums."""

    def __init__(self, z, mean, rstd, gamma, beta, weight):
        self.z, self.mean, self.rstd, self.gamma, self.beta, self.weight = z, mean, rstd, gamma, beta, weight
        self.dbeta = self.dgamma = None

    def bn(self):
        return self.mean, self.rstd, self.gamma, self.beta

    def dz_args(self):
        return self.z, self.mean, self.rstd, self.gamma, self.beta, self.dbeta, self.dgamma


def _wgrad(d_src, d_strides, layer: _Layer, act: bool, a_src, a_strides, a_mode: int, taps: int,
           geo, training: bool, dtype, norm=None, pos=None, bn_a=None, b_src=None, bn_b=None):
    out_ch, in_ch = layer.weight.shape[:2]
    dw = torch.zeros((out_ch, in_ch, taps), device=layer.z.device, dtype=torch.float32)
    block_o, block_i = min(128, max(16, _np2(out_ch))), min(128, max(16, _np2(in_ch)))
    # fp32 halves the row block: the pipelined tiles must fit in shared memory (see gemm_blocks).
    block_r = 256 if interpreting() else (64 if dtype.itemsize <= 2 else 32)
    tiles = triton.cdiv(geo.rows, block_r)
    programs = triton.cdiv(out_ch, block_o) * triton.cdiv(in_ch, block_i) * taps
    # Enough programs to fill the GPU (a few per SM); in the interpreter two
    # splits still exercise the atomic accumulation.
    want = 2 if interpreting() else triton.cdiv(4 * _sm_count(layer.z.device), programs)
    per_split = triton.cdiv(tiles, max(1, min(want, tiles)))
    splits = triton.cdiv(tiles, per_split)
    dummy = layer.z
    nmean, nstd = norm if norm is not None else (dummy, dummy)
    dot_f32, prec = dot_config(dtype)
    saib_gemm_wgrad_kernel[(triton.cdiv(out_ch, block_o), triton.cdiv(in_ch, block_i), taps * splits)](
        d_src, *d_strides, *layer.dz_args(),
        a_src, *a_strides, nmean, nstd, pos if pos is not None else dummy,
        *(bn_a or (dummy,) * 4), b_src if b_src is not None else dummy, *(bn_b or (dummy,) * 4),
        dw, geo.rows, geo.width, geo.hp, geo.wp, geo.patch, out_ch, in_ch, 1.0 / geo.rows, per_split,
        ACT=act, TRAINING=training, A_MODE=a_mode, U8=geo.uint8, VIEW_ROUND=geo.view_round, TAPS=taps,
        DOT_F32=dot_f32, PREC=prec, BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_R=block_r,
        num_warps=8 if block_o * block_i >= 128 * 128 else 4,
    )
    return dw.view_as(layer.weight) if taps == 1 else dw.view(out_ch, in_ch, 3, 3)


def _dgrad(d_src, d_strides, layer: _Layer, act: bool, taps: int, geo, training: bool, dtype,
           below: _Layer | None = None, res=None, epi_input=None):
    """dh of the layer below (and its BN-gradient sums), or, with `epi_input` =
    (g, dx or None, dpos), the input's gradients."""
    out_ch, in_ch = layer.weight.shape[:2]  # this GEMM: K = out_ch, N = in_ch
    block_r, block_n, block_k, warps, stages = gemm_blocks(out_ch, in_ch, dtype)
    tiles = triton.cdiv(geo.rows, block_r)
    dummy = layer.z
    dot_f32, prec = dot_config(dtype)
    if epi_input is None:
        out = empty((geo.rows, in_ch), device=dummy.device, dtype=dtype)
        psum = empty((tiles, in_ch), device=dummy.device, dtype=torch.float32)
        pdyx = empty(psum.shape, device=psum.device, dtype=psum.dtype)
        below_args = (below.z, *below.bn(), psum, pdyx)
        g, dx, dpos, write_dx = dummy, None, dummy, False
        g_strides = dx_strides = (0, 0, 0, 0)
    else:
        g, dx, dpos = epi_input
        out, write_dx = (dx if dx is not None else dummy), dx is not None
        below_args = (dummy,) * 7
        g_strides = image_strides(g, False)
        dx_strides = image_strides(dx, False) if write_dx else (0, 0, 0, 0)
    saib_gemm_dgrad_kernel[(tiles, triton.cdiv(in_ch, block_n))](
        d_src, *d_strides, *layer.dz_args(), layer.weight, *weight_strides(layer.weight),
        res if res is not None else dummy, out, *below_args,
        g, *g_strides, *dx_strides, dpos,
        geo.rows, geo.width, geo.hp, geo.wp, geo.patch, out_ch, in_ch, 1.0 / geo.rows,
        ACT=act, TRAINING=training, TAPS=taps, HAS_RES=res is not None, EPI=0 if epi_input is None else 1,
        WRITE_DX=write_dx, DOT_F32=dot_f32, PREC=prec, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages,
    )
    if epi_input is None:
        below.dbeta, below.dgamma = _sums(psum, pdyx)
    return out


def saib_backward(grad_out, x, norm, pos, weights, gammas, betas, zs, stats, geo, *,
                  training: bool, dtype: torch.dtype, needs_input_grad: bool):
    """Gradients of SAIB: (dx or None, dpos, 4 x dW, 4 x dgamma, 4 x dbeta).
    `zs`, `stats`, `geo`: what `saib_forward` returned; `training`: whether the
    forward normalised with batch statistics."""
    g = grad_out
    layers = [_Layer(z, mean, rstd, gamma, beta, w)
              for z, (mean, rstd), gamma, beta, w in zip(zs, stats, gammas, betas, weights)]
    l1, l2, l3, l4 = layers
    d, w = geo.batch, geo.width
    g_strides = image_strides(g, False)
    x_strides = image_strides(x, geo.uint8)

    # Layer 4's sums over g (its dy: no activation).
    block_r, block_n = (256 if interpreting() else 64), min(64, max(16, _np2(d)))
    tiles = triton.cdiv(geo.rows, block_r)
    psum = empty((tiles, d), device=g.device, dtype=torch.float32)
    pdyx = empty(psum.shape, device=psum.device, dtype=psum.dtype)
    bn_grad_partials_kernel[(tiles, triton.cdiv(d, block_n))](
        g, *g_strides, l4.z, l4.mean, l4.rstd, psum, pdyx, geo.rows, w, geo.patch, d,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4)
    l4.dbeta, l4.dgamma = _sums(psum, pdyx)

    common = {"geo": geo, "training": training, "dtype": dtype}
    m2d = matrix_strides(2 * d, w)
    dw4 = _wgrad(g, g_strides, l4, False, l2.z, m2d, 2, 1, bn_a=l2.bn(), b_src=l3.z, bn_b=l3.bn(), **common)
    dh3 = _dgrad(g, g_strides, l4, False, 1, below=l3, **common)
    dw3 = _wgrad(dh3, m2d, l3, True, l2.z, m2d, 1, 1, bn_a=l2.bn(), **common)
    dh2 = _dgrad(dh3, m2d, l3, True, 1, below=l2, res=dh3, **common)
    dw2 = _wgrad(dh2, m2d, l2, True, l1.z, matrix_strides(d, w), 1, 9, bn_a=l1.bn(), **common)
    dh1 = _dgrad(dh2, m2d, l2, True, 9, below=l1, **common)
    md = matrix_strides(d, w)
    dw1 = _wgrad(dh1, md, l1, True, x, x_strides, 0, 1, norm=norm, pos=pos, **common)
    dx = empty((d, 3, geo.height, w), device=g.device, dtype=x.dtype,
                     memory_format=torch.channels_last) if needs_input_grad else None
    dpos = torch.zeros(pos.shape, device=g.device, dtype=torch.float32)
    _dgrad(dh1, md, l1, True, 1, epi_input=(g, dx, dpos), **common)
    return (dx, dpos.to(pos.dtype), (dw1, dw2, dw3, dw4),
            tuple(layer.dgamma for layer in layers), tuple(layer.dbeta for layer in layers))
