"""SAIB's GEMMs as TMA + wgmma Triton kernels over plain 2-D operands.

Every activation is an (rows, channels) matrix in *patch order* (one p x p
patch is p*p consecutive rows; `kernels/saib_layout.py`), so each GEMM operand
tile is a plain TMA box. The 3x3 convolution's input is stored *framed*
(`saib_layout.framed_rows`): three copies of the activation, shifted by -1, 0,
+1 columns inside each patch, each patch framed by a zero row above and below.
Tap (dy, dx) of an output row tile is then the box of copy dx + 1 that starts
dy rows of pixels (dy * p rows) away, and the zero padding inside each patch
comes free. A row tile never crosses a patch (BLOCK_M divides p*p).

`saib_gemm_kernel`: C = sum_taps A_tap @ B_tap^T, A (rows, K) bf16/fp32, B the
weights (TAPS * N, K), K-contiguous, cast once per step. Epilogues:
  EPI_STATS: store C and, per row tile and column, the sum and centred sum of
      squares of the stored values (BatchNorm's statistics, combined by
      `saib_passes.bn_statistics`);
  EPI_GRAD: C (+ RES) stored, and per row tile the BatchNorm-gradient sums of
      the layer below (sum dy, sum dy * xhat, dy = C * silu'(y)), from that
      layer's pre-BN z;
  EPI_PLAIN: C (+ RES) stored.
`saib_wgrad_kernel`: dW_tap = dz^T @ A_tap over one split of the rows into
fp32 partials (no atomics), summed by `wgrad_reduce_kernel`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from iecl.kernels._triton import empty, interpreting

try:  # Triton >= 3.4 (the GPU machine has 3.6, the CPU machines 3.9): host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError as err:  # pragma: no cover - an older Triton
    raise ImportError("SAIB's Triton kernels need Triton >= 3.4 (triton.tools.tensor_descriptor)") from err

EPI_PLAIN, EPI_STATS, EPI_GRAD = 0, 1, 2


@triton.jit
def _a_row(m0, dy, copy, FRAMED: tl.constexpr, P, PP, ROWS_F):
    """First row, in the A matrix, of the rows that row tile m0 reads for a tap
    shifted by dy pixel rows and (framed) copy `copy`."""
    if FRAMED:
        n = m0 // PP
        return copy * ROWS_F + (n * (P + 2) + 1 + dy) * P + m0 % PP
    else:
        return m0


@triton.jit
def _tap(t, TAPS: tl.constexpr, MIRROR: tl.constexpr):
    """(dy, dx) of tap t = (ky, kx) of a 3x3 (0, 0 for a 1x1); mirrored for the
    transposed convolution (dgrad: row r receives from r - shift)."""
    if TAPS == 9:
        dy = t // 3 - 1
        dx = t % 3 - 1
        if MIRROR:
            dy = -dy
            dx = -dx
    else:
        dy = t * 0
        dx = t * 0
    return dy, dx


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """acc += a @ b. DOT_F32: the interpreter's bf16 tl.dot is wrong (Triton 3.9),
    so there bf16 operands are multiplied in fp32 (the same products)."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def saib_gemm_kernel(
    a_desc, b_desc, c_desc,
    res_ptr, zb_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,  # EPI_GRAD / RES inputs, (rows, N) row-major
    part_a_ptr, part_b_ptr,  # per row tile partials (tiles, N), fp32
    N, N_REAL, KSTEPS, P, PP, ROWS_F,
    TAPS: tl.constexpr, FRAMED: tl.constexpr, MIRROR: tl.constexpr, EPI: tl.constexpr,
    HAS_RES: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One pipelined loop over taps x K steps: every iteration is two TMA boxes and one wgmma.
    for i in tl.range(0, TAPS * KSTEPS, num_stages=STAGES):
        t = i // KSTEPS
        k0 = (i % KSTEPS) * BLOCK_K
        dy, dx = _tap(t, TAPS, MIRROR)
        a = a_desc.load([_a_row(m0, dy, dx + 1, FRAMED, P, PP, ROWS_F), k0])
        b = b_desc.load([t * N + n0, k0])
        acc = _dot(a, b.T, acc, DOT_F32, PREC)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offsets = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + offsets, mask=nmask[None, :], other=0.0).to(tl.float32)
    c = acc.to(c_desc.dtype)
    c_desc.store([m0, n0], c)
    if EPI == 1:
        # BatchNorm statistics of the stored (rounded) z: what the next pass normalises.
        cf = c.to(tl.float32)
        tile_sum = tl.sum(cf, axis=0)
        centred = cf - (tile_sum / BLOCK_M)[None, :]
        tl.store(part_a_ptr + pid_m * N + offs_n, tile_sum, mask=nmask)
        tl.store(part_b_ptr + pid_m * N + offs_n, tl.sum(centred * centred, axis=0), mask=nmask)
    elif EPI == 2:
        # The layer below's BN-gradient sums, from the stored dh and its pre-BN z.
        cmask = offs_n < N_REAL
        z = tl.load(zb_ptr + offsets, mask=cmask[None, :], other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + offs_n, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + offs_n, mask=cmask, other=0.0)
        gamma = tl.load(gamma_ptr + offs_n, mask=cmask, other=0.0)
        beta = tl.load(beta_ptr + offs_n, mask=cmask, other=0.0)
        xhat = (z - mean[None, :]) * rstd[None, :]
        y = xhat * gamma[None, :] + beta[None, :]
        sig = tl.sigmoid(y)
        dy_ = c.to(tl.float32) * (sig * (1.0 + y * (1.0 - sig)))
        dy_ = tl.where(cmask[None, :], dy_, 0.0)
        tl.store(part_a_ptr + pid_m * N + offs_n, tl.sum(dy_, axis=0), mask=nmask)
        tl.store(part_b_ptr + pid_m * N + offs_n, tl.sum(dy_ * xhat, axis=0), mask=nmask)


@triton.jit
def saib_wgrad_kernel(
    dz_desc, a_desc, out_ptr,  # out: fp32 partials (SPLITS * TAPS * O, I), row-major
    O, I, ROW_TILES, TILES_PER_SPLIT, P, PP, ROWS_F_DZ, ROWS_F_A,
    TAPS: tl.constexpr, DZ_FRAMED: tl.constexpr, A_FRAMED: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[split, tap, o, i] = sum_{r in split} dz[r, o] * A[shift_tap(r), i]."""
    o0 = tl.program_id(0) * BLOCK_O
    i0 = tl.program_id(1) * BLOCK_I
    tap = tl.program_id(2) % TAPS
    split = tl.program_id(2) // TAPS
    dy, dx = _tap(tap, TAPS, False)
    first = split * TILES_PER_SPLIT
    last = tl.minimum(first + TILES_PER_SPLIT, ROW_TILES)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for tile in tl.range(first, last, num_stages=STAGES):
        r0 = tile * BLOCK_R
        dz = dz_desc.load([_a_row(r0, 0, 1, DZ_FRAMED, P, PP, ROWS_F_DZ), o0])
        a = a_desc.load([_a_row(r0, dy, dx + 1, A_FRAMED, P, PP, ROWS_F_A), i0])
        acc = _dot(dz.T, a, acc, DOT_F32, PREC)
    # Stored from registers: a TMA store would stage the fp32 tile in shared
    # memory, which Triton 3.6 does not share with the pipeline (272 KB > 227).
    offs_o = (split * TAPS + tap) * O + o0 + tl.arange(0, BLOCK_O)
    offs_i = i0 + tl.arange(0, BLOCK_I)
    tl.store(out_ptr + offs_o.to(tl.int64)[:, None] * I + offs_i[None, :], acc, mask=(offs_i < I)[None, :])


@triton.jit
def wgrad_reduce_kernel(part_ptr, out_ptr, SPLITS, SIZE, BLOCK: tl.constexpr):
    """out = sum over splits of part (SPLITS, SIZE), in a fixed order (deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < SIZE
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        total += tl.load(part_ptr + s * SIZE + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, total, mask=mask)


# ---------------------------------------------------------------- launchers


def _np2(n: int) -> int:
    return triton.next_power_of_2(n)


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def dot_config(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_F32, PREC): fp32 multiplies in full precision (no TF32) so that it
    can be checked tightly; bf16/fp16 in the interpreter go through fp32."""
    return (interpreting() and dtype != torch.float32), ("ieee" if dtype == torch.float32 else "tf32")


def row_block(rows_per_patch: int, cap: int) -> int:
    """The largest power of two <= cap dividing p*p: a row tile never crosses a patch."""
    block = cap
    while rows_per_patch % block:
        block //= 2
    assert block >= 16, f"p*p = {rows_per_patch} needs a multiple of 16 (tl.dot's smallest tile)"
    return block


def gemm_config(rows_per_patch: int, k: int, n: int, dtype: torch.dtype, epi: int, wide_epilogue: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, STAGES). Shared memory holds
    STAGES x (BLOCK_M + BLOCK_N) x BLOCK_K operand elements plus the C tile the
    TMA store stages: 128x256x64 bf16 at 3 stages is 144 + 64 KB of the 227 KB
    an H100 block may use. An epilogue that holds more tiles in registers
    (the gradient's z of the layer below, a residual, an fp32 C) takes N tiles
    of 128: at 256 it spilled (sm_90a compile, batch 256, 224 px)."""
    if dtype == torch.float32 and not interpreting():
        # Full-precision fp32 (no TF32, so that it checks tightly) has no wgmma:
        # Triton multiplies with FMAs from registers, which spilled at 128x128x32
        # (8 warps) and 64x64x32 (4 warps), not at 64x64x32 with 8 warps.
        return row_block(rows_per_patch, 64), min(64, max(16, _np2(n))), min(32, max(16, _np2(k))), 8, 3
    block_m = row_block(rows_per_patch, 128)
    wide = 256 if (dtype.itemsize <= 2 and epi != EPI_GRAD and not wide_epilogue) else 128
    block_n = min(wide, max(16, _np2(n)))
    block_k = min(64 if dtype.itemsize <= 2 else 32, max(16, _np2(k)))
    if interpreting():  # the interpreter's cost is per operation: few, large tiles
        return block_m, block_n, block_k, 4, 1
    return block_m, block_n, block_k, 8, 3


def descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    assert t.dim() == 2 and t.stride(1) == 1, (t.shape, t.stride())
    return TensorDescriptor.from_tensor(t, block)


def gemm(a: torch.Tensor, weight: torch.Tensor, rows: int, geo, *, taps: int = 1, framed: bool = False,
         mirror: bool = False, epi: int = EPI_PLAIN, out_dtype=None, res=None, below=None, n_real=None):
    """C (rows, N) = sum_taps A_tap @ weight_tap^T for weight (taps * N, K).

    `a`: (rows, K), or framed (3 * framed_rows, K); `geo` gives p and the
    framed row count. Returns (C, partials or None); the partials are
    (tiles, N) pairs (sum, M2) for EPI_STATS, (sum dy, sum dy * xhat) for
    EPI_GRAD, with `below` = (z, mean, rstd, gamma, beta) of the layer below."""
    k = a.shape[1]
    n = weight.shape[0] // taps
    dtype = a.dtype
    out_dtype = out_dtype or dtype
    heavy = res is not None or out_dtype.itemsize > dtype.itemsize
    block_m, block_n, block_k, warps, stages = gemm_config(geo.patch * geo.patch, k, n, dtype, epi, heavy)
    assert rows % block_m == 0 and k % 16 == 0 and n % 16 == 0, (rows, k, n, block_m)
    c = empty((rows, n), device=a.device, dtype=out_dtype)
    tiles = rows // block_m
    with_partials = epi != EPI_PLAIN
    part_a = empty((tiles, n), device=a.device, dtype=torch.float32) if with_partials else c
    part_b = empty((tiles, n), device=a.device, dtype=torch.float32) if with_partials else c
    dummy = c
    zb, mean, rstd, gamma, beta = below if below is not None else (dummy,) * 5
    dot_f32, prec = dot_config(dtype)
    saib_gemm_kernel[(tiles, triton.cdiv(n, block_n))](
        descriptor(a, [block_m, block_k]), descriptor(weight, [block_n, block_k]),
        descriptor(c, [block_m, block_n]),
        res if res is not None else dummy, zb, mean, rstd, gamma, beta, part_a, part_b,
        n, n_real if n_real is not None else n, triton.cdiv(k, block_k), geo.patch, geo.patch * geo.patch,
        geo.framed_rows,
        TAPS=taps, FRAMED=framed, MIRROR=mirror, EPI=epi, HAS_RES=res is not None,
        DOT_F32=dot_f32, PREC=prec, STAGES=stages, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps,
    )
    return c, ((part_a, part_b, block_m) if with_partials else None)


def wgrad(dz: torch.Tensor, a: torch.Tensor, rows: int, geo, *, taps: int = 1, dz_framed: bool = False,
          a_framed: bool = False) -> torch.Tensor:
    """dW (taps, O', I) fp32 = sum_r dz[r]^T A_tap[r], split over rows into
    partials (enough programs to fill the GPU) and summed in a fixed order.
    O' >= O rounds O up to the tile (a tile must not reach into the next tap's
    rows); the rows past O are zero."""
    o, i = dz.shape[1], a.shape[1]
    dtype = dz.dtype
    block_o = min(128, max(16, _np2(o)))
    block_i = min(128 if dtype.itemsize > 2 else 256, max(16, _np2(i)))
    block_r = row_block(geo.patch * geo.patch, 64 if dtype.itemsize <= 2 else 32)
    row_tiles = rows // block_r
    programs = triton.cdiv(o, block_o) * triton.cdiv(i, block_i) * taps
    # A few programs per SM; two splits in the interpreter still exercise the reduction.
    want = 2 if interpreting() else triton.cdiv(2 * sm_count(dz.device), programs)
    per_split = triton.cdiv(row_tiles, max(1, min(want, row_tiles)))
    splits = triton.cdiv(row_tiles, per_split)
    o_pad = triton.cdiv(o, block_o) * block_o
    part = empty((splits * taps * o_pad, i), device=dz.device, dtype=torch.float32)
    dot_f32, prec = dot_config(dtype)
    saib_wgrad_kernel[(triton.cdiv(o, block_o), triton.cdiv(i, block_i), taps * splits)](
        descriptor(dz, [block_r, block_o]), descriptor(a, [block_r, block_i]), part,
        o_pad, i, row_tiles, per_split, geo.patch, geo.patch * geo.patch, geo.framed_rows, geo.framed_rows,
        TAPS=taps, DZ_FRAMED=dz_framed, A_FRAMED=a_framed, DOT_F32=dot_f32, PREC=prec,
        STAGES=1 if interpreting() else 3, BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_R=block_r,
        num_warps=4 if interpreting() else 8,
    )
    out = empty((taps, o_pad, i), device=dz.device, dtype=torch.float32)
    size = taps * o_pad * i
    block = 1024
    wgrad_reduce_kernel[(triton.cdiv(size, block),)](part, out, splits, size, BLOCK=block, num_warps=4)
    return out
