"""SAIB forward as Triton kernels (the reference is `kernels/saib_reference.py`).

The block is four convolutions over patch-images whose *channels are the
batch*. Written as matrices, every activation is (R, C) with one row per input
pixel, R = 3*H*W = N*p*p, and C = D = B or 2D channels. Rows are numbered in
the memory order of a channels-last image, r = (y*W + x)*3 + c, so that row r
of the patch matrix is `X[b, c, y, x]` for column b: a contiguous uint8 NHWC
view, a channels-last float view and the channels-last output are all read or
written along r with unit stride, and no patch tensor is ever materialised
(patchify is only index arithmetic: r -> (c, y, x) -> patch (c, y//p, x//p),
pixel (y%p, x%p)). Then

    z1 = P @ W1^T                       P = X + pos                  (R, D)
    z2 = sum_taps shift_t(h1) @ W2_t^T  h1 = silu(bn1(z1))           (R, 2D)
    z3 = h2 @ W3^T                      h2 = silu(bn2(z2))           (R, 2D)
    z4 = h3 @ W4^T                      h3 = h2 + silu(bn3(z3))      (R, D)
    out = X + (P + bn4(z4))             written channels-last        (B, 3, H, W)

Each GEMM kernel (`saib_gemm_fwd_kernel`) applies the previous layer's
BatchNorm + Swish (and the residual) while loading its A tiles, and in its
epilogue stores the pre-BN output z and, per row tile, the per-channel sum and
centred sum of squares of that tile. `bn_stats_kernel` combines the tiles
(Chan's parallel variance: no E[x^2] - E[x]^2 cancellation, deterministic, no
atomics) into mean and 1/std, and updates the running buffers. The 3x3
convolution is an implicit GEMM over 9 shifted row sets: a tap whose
neighbour falls outside the pixel's patch contributes zero (padding 1 inside
each patch). The last BatchNorm needs the statistics of all of z4 before any
output element is known, so the output is one more elementwise pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from iecl.kernels._triton import empty, interpreting

# ---------------------------------------------------------------- tile helpers


@triton.jit
def _rows(offs_r, R, W, P, DY, DX):
    """Rows r -> the pixel (c, y+DY, x+DX) and whether it lies in r's own patch."""
    c = offs_r % 3
    x = (offs_r // 3) % W
    y = offs_r // (3 * W)
    u = y % P + DY
    v = x % P + DX
    valid = (offs_r < R) & (u >= 0) & (u < P) & (v >= 0) & (v < P)
    return c, y + DY, x + DX, valid


@triton.jit
def _row_offsets(c, y, x, s_c, s_y, s_x):
    return c.to(tl.int64) * s_c + y.to(tl.int64) * s_y + x.to(tl.int64) * s_x


@triton.jit
def _pos_offsets(c, y, x, Hp, Wp, P):
    """Offset of pixel (c, y, x) in pos_embed (N, 1, p, p), n = (c, y//p, x//p)."""
    n = (c * Hp + y // P) * Wp + x // P
    return (n * P + y % P) * P + x % P


@triton.jit
def _round(v, VIEW_ROUND: tl.constexpr):
    """Round fp32 to the view's dtype (0: fp32, 1: bf16, 2: fp16) and back."""
    if VIEW_ROUND == 1:
        v = v.to(tl.bfloat16).to(tl.float32)
    elif VIEW_ROUND == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _x_tile(x_ptr, c, y, x, valid, offs_b, B, s_b, s_c, s_y, s_x, nmean_ptr, nstd_ptr,
            U8: tl.constexpr, VIEW_ROUND: tl.constexpr):
    """The query X as an fp32 (rows, batch) tile; from uint8 NHWC it is
    normalised and rounded to the view dtype, as `prepare_view_reference` does."""
    mask = valid[:, None] & (offs_b < B)[None, :]
    rows = _row_offsets(c, y, x, s_c, s_y, s_x)
    v = tl.load(x_ptr + rows[:, None] + offs_b.to(tl.int64)[None, :] * s_b, mask=mask, other=0).to(tl.float32)
    if U8:
        nmean = tl.load(nmean_ptr + c, mask=valid, other=0.0)
        nstd = tl.load(nstd_ptr + c, mask=valid, other=1.0)
        v = _round((v - nmean[:, None]) / nstd[:, None], VIEW_ROUND)
    return tl.where(mask, v, 0.0)


@triton.jit
def _bn_tile(z_ptr, rows, valid, offs_k, K, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, ACT: tl.constexpr):
    """BatchNorm (+ Swish if ACT) of an (R, K) matrix's tile; zero outside the mask
    (padding is applied to the activation, not to the pre-BN value)."""
    kmask = offs_k < K
    mask = valid[:, None] & kmask[None, :]
    z = tl.load(z_ptr + rows[:, None] + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + offs_k, mask=kmask, other=0.0)
    rstd = tl.load(rstd_ptr + offs_k, mask=kmask, other=0.0)
    gamma = tl.load(gamma_ptr + offs_k, mask=kmask, other=0.0)
    beta = tl.load(beta_ptr + offs_k, mask=kmask, other=0.0)
    scale = gamma * rstd
    y = z * scale[None, :] + (beta - mean * scale)[None, :]
    if ACT:
        y = y * tl.sigmoid(y)
    return tl.where(mask, y, 0.0)


@triton.jit
def _mma(a, b, acc, dtype_ptr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """acc += a @ b with operands in the compute dtype (that of `dtype_ptr`).
    DOT_F32: the interpreter's bf16 tl.dot is wrong (Triton 3.9), so there the
    operands are rounded to bf16 and multiplied in fp32: the same products."""
    a = a.to(dtype_ptr.dtype.element_ty)
    b = b.to(dtype_ptr.dtype.element_ty)
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _act_tile(a_ptr, a_sk, a_sc, a_sy, a_sx, nmean_ptr, nstd_ptr, pos_ptr,
              a_mean, a_rstd, a_gamma, a_beta, b_ptr, b_mean, b_rstd, b_gamma, b_beta,
              c, y, x, valid, offs_k, K, Hp, Wp, P,
              A_MODE: tl.constexpr, U8: tl.constexpr, VIEW_ROUND: tl.constexpr):
    """The input of a convolution as an fp32 (rows, K) tile:
    A_MODE 0: P = X + pos; 1: silu(bn_a(z_a)); 2: silu(bn_a(z_a)) + silu(bn_b(z_b))."""
    if A_MODE == 0:
        a = _x_tile(a_ptr, c, y, x, valid, offs_k, K, a_sk, a_sc, a_sy, a_sx, nmean_ptr, nstd_ptr, U8, VIEW_ROUND)
        pos = tl.load(pos_ptr + _pos_offsets(c, y, x, Hp, Wp, P), mask=valid, other=0.0)
        a = tl.where(valid[:, None] & (offs_k < K)[None, :], a + pos[:, None], 0.0)
    else:
        rows = _row_offsets(c, y, x, a_sc, a_sy, a_sx)
        a = _bn_tile(a_ptr, rows, valid, offs_k, K, a_mean, a_rstd, a_gamma, a_beta, True)
        if A_MODE == 2:
            a += _bn_tile(b_ptr, rows, valid, offs_k, K, b_mean, b_rstd, b_gamma, b_beta, True)
    return a


# ---------------------------------------------------------------- kernels


@triton.jit
def saib_gemm_fwd_kernel(
    a_ptr, a_sk, a_sc, a_sy, a_sx,  # A source: the image X (A_MODE 0) or z_a (R, K)
    nmean_ptr, nstd_ptr, pos_ptr,
    a_mean, a_rstd, a_gamma, a_beta,
    b_ptr, b_mean, b_rstd, b_gamma, b_beta,  # residual source z_b (A_MODE 2)
    w_ptr, w_so, w_si, w_sy, w_sx,  # weight (N, K, k, k)
    z_ptr, psum_ptr, pm2_ptr,  # out: z (R, N); per row tile sum and centred sum of squares (T, N)
    R, W, Hp, Wp, P, K, N,
    A_MODE: tl.constexpr, TAPS: tl.constexpr, U8: tl.constexpr, VIEW_ROUND: tl.constexpr,
    STATS: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """z[r, n] = sum_taps sum_k A[shift_t(r), k] * w[n, k, t]  (+ BN statistics of z)."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for t in tl.static_range(TAPS):
        # Tap t = (ky, kx) reads the neighbour (y + ky - 1, x + kx - 1); a 1x1 has one tap, (0, 0).
        c, y, x, valid = _rows(offs_r, R, W, P, (t // 3 - 1) * (TAPS // 9), (t % 3 - 1) * (TAPS // 9))
        w_tap = w_ptr + (t // 3) * w_sy + (t % 3) * w_sx
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = _act_tile(a_ptr, a_sk, a_sc, a_sy, a_sx, nmean_ptr, nstd_ptr, pos_ptr,
                          a_mean, a_rstd, a_gamma, a_beta, b_ptr, b_mean, b_rstd, b_gamma, b_beta,
                          c, y, x, valid, offs_k, K, Hp, Wp, P, A_MODE, U8, VIEW_ROUND)
            w = tl.load(w_tap + offs_k[:, None] * w_si + offs_n[None, :] * w_so,
                        mask=(offs_k < K)[:, None] & nmask[None, :], other=0.0)
            acc = _mma(a, w, acc, z_ptr, DOT_F32, PREC)
    rmask = offs_r < R
    mask = rmask[:, None] & nmask[None, :]
    z = acc.to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + offs_r.to(tl.int64)[:, None] * N + offs_n[None, :], z, mask=mask)
    if STATS:
        # Statistics of the stored (rounded) z: what the next kernel normalises.
        zf = tl.where(mask, z.to(tl.float32), 0.0)
        count = tl.minimum(R - pid_r * BLOCK_R, BLOCK_R).to(tl.float32)
        tile_sum = tl.sum(zf, axis=0)
        centred = tl.where(mask, zf - (tile_sum / count)[None, :], 0.0)
        tl.store(psum_ptr + pid_r * N + offs_n, tile_sum, mask=nmask)
        tl.store(pm2_ptr + pid_r * N + offs_n, tl.sum(centred * centred, axis=0), mask=nmask)


@triton.jit
def bn_stats_kernel(
    psum_ptr, pm2_ptr, mean_ptr, rstd_ptr, rmean_ptr, rvar_ptr,
    R, T, C, TILE_R, eps, momentum,
    UPDATE_RUNNING: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Combine T row tiles' (sum, centred M2) into per-channel mean and 1/std
    (biased variance, as BN normalises) and update the running buffers like
    nn.BatchNorm2d (unbiased variance, `momentum`)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < T)[:, None] & cmask[None, :]
        total += tl.sum(tl.load(psum_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mask, other=0.0), axis=0)
    mean = total / R
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        tmask = offs_t < T
        mask = tmask[:, None] & cmask[None, :]
        count = tl.where(tmask, tl.minimum(R - offs_t * TILE_R, TILE_R), 1).to(tl.float32)
        tile_sum = tl.load(psum_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        tile_m2 = tl.load(pm2_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        delta = tile_sum / count[:, None] - mean[None, :]
        m2 += tl.sum(tl.where(mask, tile_m2 + count[:, None] * delta * delta, 0.0), axis=0)
    var = m2 / R
    tl.store(mean_ptr + offs_c, mean, mask=cmask)
    tl.store(rstd_ptr + offs_c, 1.0 / tl.sqrt(var + eps), mask=cmask)
    if UPDATE_RUNNING:
        running_mean = tl.load(rmean_ptr + offs_c, mask=cmask, other=0.0)
        running_var = tl.load(rvar_ptr + offs_c, mask=cmask, other=0.0)
        unbiased = m2 / (R - 1)
        tl.store(rmean_ptr + offs_c, (1.0 - momentum) * running_mean + momentum * mean, mask=cmask)
        tl.store(rvar_ptr + offs_c, (1.0 - momentum) * running_var + momentum * unbiased, mask=cmask)


@triton.jit
def saib_output_kernel(
    x_ptr, x_sb, x_sc, x_sy, x_sx, nmean_ptr, nstd_ptr, pos_ptr,
    z_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
    out_ptr, o_sb, o_sc, o_sy, o_sx,
    R, W, Hp, Wp, P, B,
    U8: tl.constexpr, VIEW_ROUND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """out = X + (P + bn4(z4)), P = X + pos: the skips and unpatchify, written
    straight into the (channels-last) output."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    c, y, x, valid = _rows(offs_r, R, W, P, 0, 0)
    xv = _x_tile(x_ptr, c, y, x, valid, offs_b, B, x_sb, x_sc, x_sy, x_sx, nmean_ptr, nstd_ptr, U8, VIEW_ROUND)
    pos = tl.load(pos_ptr + _pos_offsets(c, y, x, Hp, Wp, P), mask=valid, other=0.0)
    a = _bn_tile(z_ptr, offs_r.to(tl.int64) * B, valid, offs_b, B, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, False)
    out = xv + ((xv + pos[:, None]) + a)
    out_offsets = _row_offsets(c, y, x, o_sc, o_sy, o_sx)[:, None] + offs_b.to(tl.int64)[None, :] * o_sb
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_b < B)[None, :])


# ---------------------------------------------------------------- launchers

VIEW_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass
class Geometry:
    """Where the query comes from and how rows map to pixels."""

    batch: int
    height: int
    width: int
    patch: int
    uint8: bool  # uint8 NHWC view (normalised in-kernel) rather than float (B, 3, H, W)
    view_round: int  # the dtype the uint8 view is normalised into (VIEW_ROUND code)

    @property
    def rows(self) -> int:
        return 3 * self.height * self.width

    @property
    def hp(self) -> int:
        return self.height // self.patch

    @property
    def wp(self) -> int:
        return self.width // self.patch


def image_strides(x: torch.Tensor, uint8: bool) -> tuple[int, int, int, int]:
    """(s_b, s_c, s_y, s_x) of a float (B, 3, H, W) or a uint8 (B, H, W, 3) tensor."""
    if uint8:
        s_b, s_y, s_x, s_c = x.stride()
        return s_b, s_c, s_y, s_x
    return tuple(x.stride())


def matrix_strides(channels: int, width: int) -> tuple[int, int, int, int]:
    """(s_k, s_c, s_y, s_x) of an (R, channels) activation, row r = (y*W + x)*3 + c."""
    return 1, channels, 3 * width * channels, 3 * channels


def weight_strides(w: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(w.stride())  # (C_out, C_in, kh, kw): any layout, channels-last included


def _np2(n: int) -> int:
    return triton.next_power_of_2(n)


def gemm_blocks(k: int, n: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int, int]:
    """(BLOCK_R, BLOCK_N, BLOCK_K, num_warps, num_stages). tl.dot wants every
    dimension >= 16; the interpreter runs fastest with few, large tiles.

    The pipelined operand tiles take num_stages x (BLOCK_R + BLOCK_N) x BLOCK_K
    elements of shared memory: 96 KB for 2-byte types at BLOCK_K 64. fp32 halves
    BLOCK_K to stay there; at 64 it asked an H100 for more than its 227 KB per
    block (Triton's OutOfResources, profiling/results/NVIDIA-H100-80GB-HBM3)."""
    block_n = min(128, max(16, _np2(n)))
    block_k = min(64 if dtype.itemsize <= 2 else 32, max(16, _np2(k)))
    if interpreting():  # the interpreter's cost is per operation, not per element
        return 256, block_n, block_k, 4, 1
    return 128, block_n, block_k, 8 if block_n >= 128 else 4, 3


def dot_config(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_F32, PREC): fp32 multiplies in full precision (no TF32) so that it
    can be checked tightly; bf16 in the interpreter goes through fp32."""
    return (interpreting() and dtype == torch.bfloat16), ("ieee" if dtype == torch.float32 else "tf32")


def conv_forward(a_src, a_strides, geo: Geometry, weight, out_channels: int, a_mode: int, taps: int,
                 dtype: torch.dtype, stats: bool, bn_a=None, b_src=None, bn_b=None, norm=None, pos=None):
    """One convolution as a GEMM: returns z (R, C_out) and the per-tile
    (sum, M2) partials (or None when `stats` is False)."""
    R, K, N = geo.rows, a_src.shape[-1] if a_mode else geo.batch, out_channels
    block_r, block_n, block_k, warps, stages = gemm_blocks(K, N, dtype)
    tiles = triton.cdiv(R, block_r)
    z = empty((R, N), device=weight.device, dtype=dtype)
    psum = empty((tiles, N), device=weight.device, dtype=torch.float32) if stats else z
    pm2 = empty(psum.shape, device=psum.device, dtype=psum.dtype) if stats else z
    dummy = weight
    bn_a = bn_a or (dummy,) * 4
    bn_b = bn_b or (dummy,) * 4
    nmean, nstd = norm if norm is not None else (dummy, dummy)
    dot_f32, prec = dot_config(dtype)
    saib_gemm_fwd_kernel[(tiles, triton.cdiv(N, block_n))](
        a_src, *a_strides, nmean, nstd, pos if pos is not None else dummy,
        *bn_a, b_src if b_src is not None else dummy, *bn_b,
        weight, *weight_strides(weight),
        z, psum, pm2,
        R, geo.width, geo.hp, geo.wp, geo.patch, K, N,
        A_MODE=a_mode, TAPS=taps, U8=geo.uint8, VIEW_ROUND=geo.view_round, STATS=stats,
        DOT_F32=dot_f32, PREC=prec, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages,
    )
    return z, ((psum, pm2, block_r) if stats else None)


def bn_statistics(partials, rows: int, channels: int, eps: float, momentum: float,
                  running_mean=None, running_var=None) -> tuple[torch.Tensor, torch.Tensor]:
    psum, pm2, tile_r = partials
    mean = empty(channels, device=psum.device, dtype=torch.float32)
    rstd = empty(mean.shape, device=mean.device, dtype=mean.dtype)
    update = running_mean is not None
    block_c = min(128, _np2(channels))
    bn_stats_kernel[(triton.cdiv(channels, block_c),)](
        psum, pm2, mean, rstd, running_mean if update else mean, running_var if update else mean,
        rows, psum.shape[0], channels, tile_r, eps, momentum,
        UPDATE_RUNNING=update, BLOCK_T=64, BLOCK_C=block_c,
    )
    return mean, rstd


def saib_forward(x, norm, pos, weights, gammas, betas, running_means, running_vars, *,
                 patch: int, training: bool, momentum: float, eps: float,
                 dtype: torch.dtype, out_dtype: torch.dtype, view_dtype: torch.dtype | None = None):
    """Run SAIB forward. `x`: float (B, 3, H, W), or uint8 (B, H, W, 3) with
    `norm` = (mean, std) and `view_dtype`. `dtype`: the GEMMs' operand and
    activation dtype. Returns (out, z1..z4, stats) with stats = 4 x (mean, rstd)
    used for normalisation (batch statistics when training)."""
    uint8 = x.dtype == torch.uint8
    if uint8:
        b, h, w, _ = x.shape
    else:
        b, _, h, w = x.shape
    geo = Geometry(b, h, w, patch, uint8, VIEW_ROUND[view_dtype] if uint8 else 0)
    batch_stats = training or running_means is None
    x_strides = image_strides(x, uint8)
    zs, stats = [], []

    def finish(layer: int, z, partials):
        if batch_stats:
            update = training and running_means is not None
            mean, rstd = bn_statistics(partials, geo.rows, z.shape[1], eps, momentum,
                                       running_means[layer] if update else None,
                                       running_vars[layer] if update else None)
        else:
            mean = running_means[layer].float()
            rstd = torch.rsqrt(running_vars[layer].float() + eps)
        zs.append(z)
        stats.append((mean, rstd))
        return (mean, rstd, gammas[layer], betas[layer])

    d = b
    z, part = conv_forward(x, x_strides, geo, weights[0], d, 0, 1, dtype, batch_stats, norm=norm, pos=pos)
    bn1 = finish(0, z, part)
    z, part = conv_forward(zs[0], matrix_strides(d, w), geo, weights[1], 2 * d, 1, 9, dtype, batch_stats, bn_a=bn1)
    bn2 = finish(1, z, part)
    z, part = conv_forward(zs[1], matrix_strides(2 * d, w), geo, weights[2], 2 * d, 1, 1, dtype, batch_stats, bn_a=bn2)
    bn3 = finish(2, z, part)
    z, part = conv_forward(zs[1], matrix_strides(2 * d, w), geo, weights[3], d, 2, 1, dtype, batch_stats,
                           bn_a=bn2, b_src=zs[2], bn_b=bn3)
    bn4 = finish(3, z, part)

    out = empty((b, 3, h, w), device=x.device, dtype=out_dtype, memory_format=torch.channels_last)
    block_r, block_b = (256 if interpreting() else 64), min(64, max(16, _np2(b)))
    nmean, nstd = norm if norm is not None else (pos, pos)
    saib_output_kernel[(triton.cdiv(geo.rows, block_r), triton.cdiv(b, block_b))](
        x, *x_strides, nmean, nstd, pos, zs[3], *bn4, out, *image_strides(out, False),
        geo.rows, w, geo.hp, geo.wp, patch, b,
        U8=uint8, VIEW_ROUND=geo.view_round, BLOCK_R=block_r, BLOCK_B=block_b, num_warps=4,
    )
    return out, zs, stats, geo
