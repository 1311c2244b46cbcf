"""View preparation as one Triton pass: uint8 (B, H, W, C) -> normalised
`dtype` (B, C, H, W) with channels-last strides.

Channels-last (B, C, H, W) has the memory order of (B, H, W, C), so for a
contiguous input the kernel is a flat elementwise map `out[i] = (in[i] -
mean[i % C]) / std[i % C]`: one read of each byte, one write of each output
element. Same signature and semantics as `kernels.view_prep.prepare_view_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from iecl.kernels._triton import empty


@triton.jit
def view_prep_kernel(
    in_ptr, out_ptr, mean_ptr, std_ptr, total, H, W,
    s_b, s_h, s_w, s_c,
    C: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    # offs enumerates the output in its memory order (B, H, W, C).
    c = offs % C
    x = (offs // C) % W
    y = (offs // (C * W)) % H
    b = offs // (C * W * H)
    pixel = tl.load(in_ptr + b * s_b + y * s_h + x * s_w + c * s_c, mask=mask, other=0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
    std = tl.load(std_ptr + c, mask=mask, other=1.0)
    tl.store(out_ptr + offs, ((pixel - mean) / std).to(out_ptr.dtype.element_ty), mask=mask)


def prepare_view_triton(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """uint8 (B, H, W, C) -> `dtype` (B, C, H, W) channels-last, (x - mean) / std.

    `mean` and `std` are (C,) float32 in the 0-255 range of the input.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (B, H, W, C) views, got {images.dtype} {tuple(images.shape)}")
    b, h, w, c = images.shape
    out = empty((b, c, h, w), dtype=dtype, device=images.device, memory_format=torch.channels_last)
    total = out.numel()
    if total == 0:
        return out
    mean = mean.to(device=images.device, dtype=torch.float32).contiguous()
    std = std.to(device=images.device, dtype=torch.float32).contiguous()
    block = 1024
    s_b, s_h, s_w, s_c = images.stride()
    view_prep_kernel[(triton.cdiv(total, block),)](
        images, out, mean, std, total, h, w, s_b, s_h, s_w, s_c, C=c, BLOCK=block, num_warps=4
    )
    return out
