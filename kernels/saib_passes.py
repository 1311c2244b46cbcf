"""SAIB's memory-bound passes and BatchNorm reductions (Triton), around the
GEMMs of `kernels/saib_gemm.py`.

Layout. Patch-images are (N, B, p, p) with N = 3 (H/p) (W/p) patches and the
batch B as channels (`kernels/saib_reference.py`). Every activation is a
matrix (R, C') with R = N p p rows in *patch order*, r = (n p + u) p + v for
pixel (u, v) of patch n = (c Hp + py) Wp + px, and C' = the channels rounded up
to 16 (TMA wants 16-byte row strides; the extra columns are written as zeros).
The 3x3's input is stored *framed*: (3 * RF, C') with RF = N (p+2) p, copy s in
{0, 1, 2} holding, at row (n (p+2) + u') p + v', the pixel (u' - 1, v' + s - 1)
of patch n, or zero outside the patch (`_source_row`).

Each BatchNorm-apply + Swish (+ residual) runs once per element, here; the
special-function work never sits in a GEMM's K loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from iecl.kernels._triton import empty, interpreting

CHANNEL_ALIGN = 16


@dataclass
class Geometry:
    """Where the query comes from and how matrix rows map to pixels."""

    batch: int
    height: int
    width: int
    patch: int
    uint8: bool  # uint8 NHWC view (normalised in-kernel) rather than float (B, 3, H, W)
    view_round: int  # the dtype the uint8 view is normalised into (VIEW_ROUND code)

    @property
    def hp(self) -> int:
        return self.height // self.patch

    @property
    def wp(self) -> int:
        return self.width // self.patch

    @property
    def patches(self) -> int:
        return 3 * self.hp * self.wp

    @property
    def rows(self) -> int:
        return self.patches * self.patch * self.patch

    @property
    def framed_rows(self) -> int:
        return self.patches * (self.patch + 2) * self.patch


def padded(channels: int) -> int:
    return triton.cdiv(channels, CHANNEL_ALIGN) * CHANNEL_ALIGN


VIEW_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def image_strides(x: torch.Tensor, uint8: bool) -> tuple[int, int, int, int]:
    """(s_b, s_c, s_y, s_x) of a float (B, 3, H, W) or a uint8 (B, H, W, 3) tensor."""
    if uint8:
        s_b, s_y, s_x, s_c = x.stride()
        return s_b, s_c, s_y, s_x
    return tuple(x.stride())


# ---------------------------------------------------------------- row maps


@triton.jit
def _pixel(r, P, PP, Hp, Wp):
    """Patch-order row r -> image pixel (c, y, x)."""
    n = r // PP
    q = r % PP
    c = n // (Hp * Wp)
    y = ((n // Wp) % Hp) * P + q // P
    x = (n % Wp) * P + q % P
    return c, y, x


@triton.jit
def _source_row(f, R, P, ROWS_F, FRAMED: tl.constexpr):
    """The plain row an output row f holds, and whether it holds one (framed:
    the frame and the shifted-out column are zeros)."""
    if FRAMED:
        copy = f // ROWS_F
        g = f % ROWS_F
        n = g // ((P + 2) * P)
        u = (g % ((P + 2) * P)) // P - 1
        v = g % P + copy - 1
        valid = (f < 3 * ROWS_F) & (u >= 0) & (u < P) & (v >= 0) & (v < P)
        return n * P * P + u * P + v, valid
    else:
        return f, f < R


@triton.jit
def _round(v, VIEW_ROUND: tl.constexpr):
    """Round fp32 to the view's dtype (0: fp32, 1: bf16, 2: fp16) and back."""
    if VIEW_ROUND == 1:
        v = v.to(tl.bfloat16).to(tl.float32)
    elif VIEW_ROUND == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _image_tile(x_ptr, c, y, x, rmask, offs_b, B, s_b, s_c, s_y, s_x, nmean_ptr, nstd_ptr,
                U8: tl.constexpr, VIEW_ROUND: tl.constexpr):
    """An image as an fp32 (rows, batch) tile; from uint8 NHWC it is normalised
    and rounded to the view dtype, as `prepare_view_reference` does."""
    mask = rmask[:, None] & (offs_b < B)[None, :]
    rows = c.to(tl.int64) * s_c + y.to(tl.int64) * s_y + x.to(tl.int64) * s_x
    v = tl.load(x_ptr + rows[:, None] + offs_b.to(tl.int64)[None, :] * s_b, mask=mask, other=0).to(tl.float32)
    if U8:
        nmean = tl.load(nmean_ptr + c, mask=rmask, other=0.0)
        nstd = tl.load(nstd_ptr + c, mask=rmask, other=1.0)
        v = _round((v - nmean[:, None]) / nstd[:, None], VIEW_ROUND)
    return tl.where(mask, v, 0.0)


@triton.jit
def _bn(z, offs_c, cmask, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr):
    """(xhat, y = gamma xhat + beta) of an fp32 (rows, C) tile."""
    mean = tl.load(mean_ptr + offs_c, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + offs_c, mask=cmask, other=0.0)
    gamma = tl.load(gamma_ptr + offs_c, mask=cmask, other=0.0)
    beta = tl.load(beta_ptr + offs_c, mask=cmask, other=0.0)
    xhat = (z - mean[None, :]) * rstd[None, :]
    return xhat, xhat * gamma[None, :] + beta[None, :]


# ---------------------------------------------------------------- forward passes


@triton.jit
def patches_kernel(x_ptr, s_b, s_c, s_y, s_x, nmean_ptr, nstd_ptr, pos_ptr, out_ptr,
                   R, B, CP, P, PP, Hp, Wp,
                   U8: tl.constexpr, VIEW_ROUND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """P = X + pos as a (R, C') matrix (the query's uint8 normalisation fused)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_b = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = offs_r < R
    c, y, x = _pixel(offs_r, P, PP, Hp, Wp)
    v = _image_tile(x_ptr, c, y, x, rmask, offs_b, B, s_b, s_c, s_y, s_x, nmean_ptr, nstd_ptr, U8, VIEW_ROUND)
    pos = tl.load(pos_ptr + offs_r, mask=rmask, other=0.0)
    v = tl.where((offs_b < B)[None, :], v + pos[:, None], 0.0)
    tl.store(out_ptr + offs_r.to(tl.int64)[:, None] * CP + offs_b[None, :], v.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & (offs_b < CP)[None, :])


@triton.jit
def _row_tile(R, C, CP, P, ROWS_F, FRAMED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of a plain (R, C') or framed (3 RF, C') pass: its
    output rows and channels, the plain rows they read, which are real, the
    masks and the source offsets."""
    offs_f = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    src, valid = _source_row(offs_f, R, P, ROWS_F, FRAMED)
    cmask = offs_c < C
    mask = valid[:, None] & cmask[None, :]
    offsets = src.to(tl.int64)[:, None] * CP + offs_c[None, :]
    return offs_f, offs_c, src, valid, cmask, mask, offsets


@triton.jit
def _store_rows(out_ptr, value, offs_f, offs_c, CP, ROWS_OUT):
    """The tile's output rows (padding channels included: they are written as the zeros `value` holds there)."""
    tl.store(out_ptr + offs_f.to(tl.int64)[:, None] * CP + offs_c[None, :], value.to(out_ptr.dtype.element_ty),
             mask=(offs_f < ROWS_OUT)[:, None] & (offs_c < CP)[None, :])


@triton.jit
def act_kernel(z_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, res_ptr, out_ptr,
               ROWS_OUT, R, C, CP, P, ROWS_F,
               HAS_RES: tl.constexpr, FRAMED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = silu(bn(z)) (+ res), plain (R, C') or framed (3 RF, C')."""
    offs_f, offs_c, _, _, cmask, mask, offsets = _row_tile(R, C, CP, P, ROWS_F, FRAMED, BLOCK_R, BLOCK_C)
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    _, y = _bn(z, offs_c, cmask, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr)
    h = y * tl.sigmoid(y)
    if HAS_RES:
        h += tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    h = tl.where(mask, h, 0.0)
    _store_rows(out_ptr, h, offs_f, offs_c, CP, ROWS_OUT)


@triton.jit
def output_kernel(x_ptr, x_sb, x_sc, x_sy, x_sx, nmean_ptr, nstd_ptr, pos_ptr,
                  z_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
                  out_ptr, o_sb, o_sc, o_sy, o_sx, R, B, CP, P, PP, Hp, Wp,
                  U8: tl.constexpr, VIEW_ROUND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = X + (P + bn4(z4)), P = X + pos: both skips and unpatchify, written
    into the (channels-last) output image."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_b = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = offs_r < R
    bmask = offs_b < B
    c, y, x = _pixel(offs_r, P, PP, Hp, Wp)
    xv = _image_tile(x_ptr, c, y, x, rmask, offs_b, B, x_sb, x_sc, x_sy, x_sx, nmean_ptr, nstd_ptr, U8, VIEW_ROUND)
    pos = tl.load(pos_ptr + offs_r, mask=rmask, other=0.0)
    mask = rmask[:, None] & bmask[None, :]
    z = tl.load(z_ptr + offs_r.to(tl.int64)[:, None] * CP + offs_b[None, :], mask=mask, other=0.0).to(tl.float32)
    _, a = _bn(z, offs_b, bmask, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr)
    out = xv + ((xv + pos[:, None]) + a)
    pixel = c.to(tl.int64) * o_sc + y.to(tl.int64) * o_sy + x.to(tl.int64) * o_sx
    tl.store(out_ptr + pixel[:, None] + offs_b.to(tl.int64)[None, :] * o_sb, out.to(out_ptr.dtype.element_ty),
             mask=mask)


# ---------------------------------------------------------------- backward passes


@triton.jit
def grad_in_kernel(g_ptr, g_sb, g_sc, g_sy, g_sx, z_ptr, mean_ptr, rstd_ptr, psum_ptr, pdyx_ptr,
                   R, B, CP, P, PP, Hp, Wp, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per row tile, layer 4's BN-gradient sums straight from the output's
    gradient g (no activation there: dy = g)."""
    pid_r = tl.program_id(0)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_b = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = offs_r < R
    bmask = offs_b < B
    c, y, x = _pixel(offs_r, P, PP, Hp, Wp)
    g = _image_tile(g_ptr, c, y, x, rmask, offs_b, B, g_sb, g_sc, g_sy, g_sx, g_ptr, g_ptr, False, 0)
    mask = rmask[:, None] & bmask[None, :]
    z = tl.load(z_ptr + offs_r.to(tl.int64)[:, None] * CP + offs_b[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + offs_b, mask=bmask, other=0.0)
    rstd = tl.load(rstd_ptr + offs_b, mask=bmask, other=0.0)
    xhat = tl.where(mask, (z - mean[None, :]) * rstd[None, :], 0.0)
    tl.store(psum_ptr + pid_r * CP + offs_b, tl.sum(g, axis=0), mask=offs_b < CP)
    tl.store(pdyx_ptr + pid_r * CP + offs_b, tl.sum(g * xhat, axis=0), mask=offs_b < CP)


@triton.jit
def dz_kernel(d_ptr, d_sb, d_sc, d_sy, d_sx, z_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, sdy_ptr, sdyx_ptr,
              out_ptr, ROWS_OUT, R, C, CP, P, ROWS_F, Hp, Wp, inv_R,
              ACT: tl.constexpr, TRAINING: tl.constexpr, FRAMED: tl.constexpr, D_IMAGE: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dz = gamma rstd (dy - sum dy / R - xhat sum(dy xhat) / R), dy = d (* silu'(y)),
    plain (R, C') or framed (3 RF, C'); in eval mode dz = gamma rstd dy. d is
    an (R, C') matrix, or (D_IMAGE) the output's gradient as an image."""
    offs_f, offs_c, src, valid, cmask, mask, offsets = _row_tile(R, C, CP, P, ROWS_F, FRAMED, BLOCK_R, BLOCK_C)
    if D_IMAGE:
        c, y, x = _pixel(src, P, P * P, Hp, Wp)
        d = _image_tile(d_ptr, c, y, x, valid, offs_c, C, d_sb, d_sc, d_sy, d_sx, d_ptr, d_ptr, False, 0)
    else:
        d = tl.load(d_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    xhat, y = _bn(z, offs_c, cmask, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr)
    if ACT:
        sig = tl.sigmoid(y)
        d = d * (sig * (1.0 + y * (1.0 - sig)))
    if TRAINING:
        sdy = tl.load(sdy_ptr + offs_c, mask=cmask, other=0.0) * inv_R
        sdyx = tl.load(sdyx_ptr + offs_c, mask=cmask, other=0.0) * inv_R
        d = d - sdy[None, :] - xhat * sdyx[None, :]
    gamma = tl.load(gamma_ptr + offs_c, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + offs_c, mask=cmask, other=0.0)
    dz = tl.where(mask, d * (gamma * rstd)[None, :], 0.0)
    _store_rows(out_ptr, dz, offs_f, offs_c, CP, ROWS_OUT)


@triton.jit
def grad_out_kernel(g_ptr, g_sb, g_sc, g_sy, g_sx, dq_ptr, dx_ptr, dx_sb, dx_sc, dx_sy, dx_sx, dpos_ptr,
                    R, B, CP, P, PP, Hp, Wp,
                    WRITE_DX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """From dQ = dz1 @ W1: P's gradient dP = g + dQ (P feeds conv1 and the
    inner skip), the input's dX = g + dP (the outer skip) and pos_embed's, the
    sum of dP over the batch (one program per row block: no atomics)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    c, y, x = _pixel(offs_r, P, PP, Hp, Wp)
    pixel = c.to(tl.int64) * dx_sc + y.to(tl.int64) * dx_sy + x.to(tl.int64) * dx_sx
    dpos = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_C):
        offs_b = b0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (offs_b < B)[None, :]
        g = _image_tile(g_ptr, c, y, x, rmask, offs_b, B, g_sb, g_sc, g_sy, g_sx, g_ptr, g_ptr, False, 0)
        dq = tl.load(dq_ptr + offs_r.to(tl.int64)[:, None] * CP + offs_b[None, :], mask=mask, other=0.0)
        dp = tl.where(mask, g + dq, 0.0)
        dpos += tl.sum(dp, axis=1)
        if WRITE_DX:
            tl.store(dx_ptr + pixel[:, None] + offs_b.to(tl.int64)[None, :] * dx_sb,
                     (g + dp).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dpos_ptr + offs_r, dpos, mask=rmask)


# ---------------------------------------------------------------- reductions


@triton.jit
def chan_group_kernel(psum_ptr, pm2_ptr, gsum_ptr, gm2_ptr, T, C, STRIDE, TILE_R, TILES_PER_GROUP,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Combine the full row tiles [g TPG, (g+1) TPG) of (sum, centred M2)
    partials into one group's (sum, M2) about the group's mean (Chan: no
    E[x^2] - E[x]^2 cancellation, deterministic, no atomics)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    group = tl.program_id(1)
    cmask = offs_c < C
    first = group * TILES_PER_GROUP
    last = tl.minimum(first + TILES_PER_GROUP, T)
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(first, last, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < last)[:, None] & cmask[None, :]
        total += tl.sum(tl.load(psum_ptr + offs_t[:, None] * STRIDE + offs_c[None, :], mask=mask, other=0.0), 0)
    mean = total / ((last - first) * TILE_R).to(tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(first, last, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < last)[:, None] & cmask[None, :]
        offsets = offs_t[:, None] * STRIDE + offs_c[None, :]
        delta = tl.load(psum_ptr + offsets, mask=mask, other=0.0) / TILE_R - mean[None, :]
        tile_m2 = tl.load(pm2_ptr + offsets, mask=mask, other=0.0)
        m2 += tl.sum(tl.where(mask, tile_m2 + TILE_R * delta * delta, 0.0), axis=0)
    tl.store(gsum_ptr + group * C + offs_c, total, mask=cmask)
    tl.store(gm2_ptr + group * C + offs_c, m2, mask=cmask)


@triton.jit
def bn_stats_kernel(gsum_ptr, gm2_ptr, mean_ptr, rstd_ptr, rmean_ptr, rvar_ptr,
                    R, G, C, GROUP_R, eps, momentum,
                    UPDATE_RUNNING: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """Combine G groups' (sum, M2) into per-channel mean and 1/std (biased
    variance, as BN normalises) and update the running buffers like
    nn.BatchNorm2d (unbiased variance, `momentum`)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        mask = (offs_g < G)[:, None] & cmask[None, :]
        total += tl.sum(tl.load(gsum_ptr + offs_g[:, None] * C + offs_c[None, :], mask=mask, other=0.0), axis=0)
    mean = total / R
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        gmask = offs_g < G
        mask = gmask[:, None] & cmask[None, :]
        count = tl.where(gmask, tl.minimum(R - offs_g * GROUP_R, GROUP_R), 1).to(tl.float32)
        group_sum = tl.load(gsum_ptr + offs_g[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        group_m2 = tl.load(gm2_ptr + offs_g[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        delta = group_sum / count[:, None] - mean[None, :]
        m2 += tl.sum(tl.where(mask, group_m2 + count[:, None] * delta * delta, 0.0), axis=0)
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
def sum_groups_kernel(pa_ptr, pb_ptr, out_a_ptr, out_b_ptr, T, C, STRIDE, TILES_PER_GROUP,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum rows [g TPG, (g+1) TPG) of two (T, STRIDE) partial buffers into row g
    of (groups, C) outputs (fixed order: deterministic)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    group = tl.program_id(1)
    cmask = offs_c < C
    first = group * TILES_PER_GROUP
    last = tl.minimum(first + TILES_PER_GROUP, T)
    total_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    total_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(first, last, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < last)[:, None] & cmask[None, :]
        offsets = offs_t[:, None] * STRIDE + offs_c[None, :]
        total_a += tl.sum(tl.load(pa_ptr + offsets, mask=mask, other=0.0), axis=0)
        total_b += tl.sum(tl.load(pb_ptr + offsets, mask=mask, other=0.0), axis=0)
    tl.store(out_a_ptr + group * C + offs_c, total_a, mask=cmask)
    tl.store(out_b_ptr + group * C + offs_c, total_b, mask=cmask)


# ---------------------------------------------------------------- launchers


def _np2(n: int) -> int:
    return triton.next_power_of_2(n)


#: The passes that write the image hold an x tile, a matrix tile and int64
#: pixel offsets, the dz pass three fp32 tiles: at 4 warps they spilled
#: (sm_90a compile, batch 256, 224 px; dz with Triton 3.6 only).
IMAGE_WARPS = MATRIX_WARPS = 8


def pass_blocks(channels: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the elementwise passes."""
    return (256 if interpreting() else 64), min(128, max(16, _np2(channels)))


def _groups(tiles: int, device: torch.device) -> tuple[int, int]:
    """(groups, tiles per group) of a two-level reduction: at least one
    program per SM in the first level on an H100 (132), one in the second."""
    want = 2 if interpreting() else 64
    per_group = triton.cdiv(tiles, max(1, min(want, tiles)))
    return triton.cdiv(tiles, per_group), per_group


def bn_statistics(partials, rows: int, channels: int, eps: float, momentum: float,
                  running_mean=None, running_var=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1/std from a GEMM's per-tile (sum, M2), the running buffers updated."""
    psum, pm2, tile_r = partials
    tiles, stride = psum.shape
    groups, per_group = _groups(tiles, psum.device)
    block_c = 32 if not interpreting() else min(128, _np2(channels))
    gsum = empty((groups, channels), device=psum.device, dtype=torch.float32)
    gm2 = empty(gsum.shape, device=gsum.device, dtype=gsum.dtype)
    chan_group_kernel[(triton.cdiv(channels, block_c), groups)](
        psum, pm2, gsum, gm2, tiles, channels, stride, tile_r, per_group, BLOCK_T=32, BLOCK_C=block_c)
    mean = empty(channels, device=psum.device, dtype=torch.float32)
    rstd = empty(mean.shape, device=mean.device, dtype=mean.dtype)
    update = running_mean is not None
    bn_stats_kernel[(triton.cdiv(channels, block_c),)](
        gsum, gm2, mean, rstd, running_mean if update else mean, running_var if update else mean,
        rows, groups, channels, per_group * tile_r, eps, momentum,
        UPDATE_RUNNING=update, BLOCK_G=64, BLOCK_C=block_c)
    return mean, rstd


def grad_sums(psum: torch.Tensor, pdyx: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum dy, sum dy xhat) per channel = (dbeta, dgamma) from per-tile partials."""
    tiles, stride = psum.shape
    groups, per_group = _groups(tiles, psum.device)
    block_c = 32 if not interpreting() else min(128, _np2(channels))
    ga = empty((groups, channels), device=psum.device, dtype=torch.float32)
    gb = empty(ga.shape, device=ga.device, dtype=ga.dtype)
    sum_groups_kernel[(triton.cdiv(channels, block_c), groups)](
        psum, pdyx, ga, gb, tiles, channels, stride, per_group, BLOCK_T=32, BLOCK_C=block_c)
    dbeta = empty(channels, device=psum.device, dtype=torch.float32)
    dgamma = empty(dbeta.shape, device=dbeta.device, dtype=dbeta.dtype)
    sum_groups_kernel[(triton.cdiv(channels, block_c), 1)](
        ga, gb, dbeta, dgamma, groups, channels, channels, groups, BLOCK_T=32, BLOCK_C=block_c)
    return dbeta, dgamma


def patches(x, x_strides, norm, pos, geo: Geometry, dtype) -> torch.Tensor:
    cp = padded(geo.batch)
    out = empty((geo.rows, cp), device=pos.device, dtype=dtype)
    block_r, block_c = pass_blocks(cp)
    nmean, nstd = norm if norm is not None else (pos, pos)
    patches_kernel[(triton.cdiv(geo.rows, block_r), triton.cdiv(cp, block_c))](
        x, *x_strides, nmean, nstd, pos, out, geo.rows, geo.batch, cp, geo.patch, geo.patch ** 2, geo.hp, geo.wp,
        U8=geo.uint8, VIEW_ROUND=geo.view_round, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out


def activation(z, bn, channels: int, geo: Geometry, *, res=None, framed: bool = False) -> torch.Tensor:
    """silu(bn(z)) (+ res), plain or framed; `bn` = (mean, rstd, gamma, beta)."""
    cp = z.shape[1]
    rows_out = 3 * geo.framed_rows if framed else geo.rows
    out = empty((rows_out, cp), device=z.device, dtype=z.dtype)
    block_r, block_c = pass_blocks(cp)
    act_kernel[(triton.cdiv(rows_out, block_r), triton.cdiv(cp, block_c))](
        z, *bn, res if res is not None else z, out, rows_out, geo.rows, channels, cp, geo.patch, geo.framed_rows,
        HAS_RES=res is not None, FRAMED=framed, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=MATRIX_WARPS)
    return out


def output(x, x_strides, norm, pos, z4, bn4, geo: Geometry, out_dtype) -> torch.Tensor:
    b = geo.batch
    out = empty((b, 3, geo.height, geo.width), device=z4.device, dtype=out_dtype, memory_format=torch.channels_last)
    block_r, block_c = pass_blocks(b)
    nmean, nstd = norm if norm is not None else (pos, pos)
    output_kernel[(triton.cdiv(geo.rows, block_r), triton.cdiv(b, block_c))](
        x, *x_strides, nmean, nstd, pos, z4, *bn4, out, *image_strides(out, False),
        geo.rows, b, z4.shape[1], geo.patch, geo.patch ** 2, geo.hp, geo.wp,
        U8=geo.uint8, VIEW_ROUND=geo.view_round, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=IMAGE_WARPS)
    return out


def grad_in(g, z4, mean4, rstd4, geo: Geometry):
    """Layer 4's (dbeta, dgamma) from the output's gradient g (B, 3, H, W)."""
    cp = z4.shape[1]
    block_r, block_c = pass_blocks(cp)
    tiles = triton.cdiv(geo.rows, block_r)
    psum = empty((tiles, cp), device=g.device, dtype=torch.float32)
    pdyx = empty(psum.shape, device=psum.device, dtype=psum.dtype)
    grad_in_kernel[(tiles, triton.cdiv(cp, block_c))](
        g, *image_strides(g, False), z4, mean4, rstd4, psum, pdyx,
        geo.rows, geo.batch, cp, geo.patch, geo.patch ** 2, geo.hp, geo.wp,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=IMAGE_WARPS)
    return grad_sums(psum, pdyx, geo.batch)


def dz(d, z, bn, sums, channels: int, geo: Geometry, *, act: bool, training: bool, dtype,
       framed: bool = False) -> torch.Tensor:
    """A layer's dz from the gradient d of its output (an (R, C') matrix or,
    for layer 4, the output's gradient image), plain or framed."""
    cp = z.shape[1]
    rows_out = 3 * geo.framed_rows if framed else geo.rows
    out = empty((rows_out, cp), device=z.device, dtype=dtype)
    block_r, block_c = pass_blocks(cp)
    d_image = d.dim() == 4
    dz_kernel[(triton.cdiv(rows_out, block_r), triton.cdiv(cp, block_c))](
        d, *(image_strides(d, False) if d_image else (0,) * 4), z, *bn, *sums, out,
        rows_out, geo.rows, channels, cp, geo.patch, geo.framed_rows, geo.hp, geo.wp, 1.0 / geo.rows,
        ACT=act, TRAINING=training, FRAMED=framed, D_IMAGE=d_image, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=MATRIX_WARPS)
    return out


def grad_out(g, dq, geo: Geometry, dx_dtype, write_dx: bool):
    """(dX or None, dpos (R,) fp32) from g and dQ = dz1 @ W1 (R, C')."""
    b = geo.batch
    dx = empty((b, 3, geo.height, geo.width), device=g.device, dtype=dx_dtype,
               memory_format=torch.channels_last) if write_dx else None
    dpos = empty((geo.rows,), device=g.device, dtype=torch.float32)
    block_r, block_c = pass_blocks(b)
    grad_out_kernel[(triton.cdiv(geo.rows, block_r),)](
        g, *image_strides(g, False), dq, dx if write_dx else dq, *(image_strides(dx, False) if write_dx else (0,) * 4),
        dpos, geo.rows, b, dq.shape[1], geo.patch, geo.patch ** 2, geo.hp, geo.wp,
        WRITE_DX=write_dx, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=IMAGE_WARPS)
    return dx, dpos
