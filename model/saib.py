"""SAIB: the Sample Augmentation Incremental Block (IE-CL paper, Section 3.3,
Appendix C, Figure 6), as DESIGN.md "The method", point 3 fixes it.

Input `X` is a query-view batch `(B, 3, H, W)`. It is cut into
`N = 3 * (H/p) * (W/p)` patch-images of `p x p` pixels whose channels are the
*batch*: `P[n, b, u, v] = X[b, c, i*p + u, j*p + v]` with `n = (c, i, j)`, so a
convolution over channels mixes samples. A learnable positional embedding per
patch position is added, then

    h1 = swish(BN(conv1x1_{D->D}(P)))
    h2 = swish(BN(conv3x3_{D->2D}(h1)))          zero padding at patch borders
    h3 = h2 + swish(BN(conv1x1_{2D->2D}(h2)))    skip 1: around the square conv
    A  = BN(conv1x1_{2D->D}(h3))                 no activation
    P' = P + A                                   skip 2: around the stack
    X' = X + unpatchify(P')                      skip 3: outside

with `D = B`. Note what the third skip implies when taken literally (as the
paper and DESIGN.md write it): `X' = 2 X + pos + A(P)`. The encoder's stem is a
(spectral-normalised, linear) conv followed by BatchNorm, so the factor 2 on
`X` does not change what the encoder sees beyond what `pos` and `A` add.

BatchNorm statistics are per channel, i.e. per sample, over all its patch
pixels (the `N` patch-images are the convolution's batch). The weights' shapes
depend on the per-device batch size, so SAIB accepts exactly `batch_size`
samples: loaders drop the last partial batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


class ConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
        )


class SAIB(nn.Module):
    def __init__(
        self,
        batch_size: int,
        image_size: tuple[int, int],
        patch_size: int = 16,
        channels: int = 3,
    ) -> None:
        super().__init__()
        height, width = image_size
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"SAIB patch size {patch_size} must divide the image size {height}x{width}"
            )
        d = batch_size
        self.batch_size, self.patch_size = batch_size, patch_size
        self.channels, self.height, self.width = channels, height, width
        self.num_patches = channels * (height // patch_size) * (width // patch_size)
        # One embedding per patch position, shared by all samples (channels).
        self.pos_embed = nn.Parameter(torch.zeros(self.num_patches, 1, patch_size, patch_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.conv1 = ConvBN(d, d, 1)
        self.conv2 = ConvBN(d, 2 * d, 3)
        self.conv3 = ConvBN(2 * d, 2 * d, 1)
        self.conv4 = ConvBN(2 * d, d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, H, W), channels-last."""
        b, c, h, w = x.shape
        if (b, c, h, w) != (self.batch_size, self.channels, self.height, self.width):
            raise ValueError(
                f"SAIB was built for batches of shape {(self.batch_size, self.channels, self.height, self.width)}, "
                f"got {tuple(x.shape)}; its weights depend on the per-device batch size"
            )
        patches = patchify(x, self.patch_size) + self.pos_embed  # (N, B, p, p)
        h1 = F.silu(self.conv1(patches))
        h2 = F.silu(self.conv2(h1))  # zero padding 1 at each patch's border
        h3 = h2 + F.silu(self.conv3(h2))
        patches = patches + self.conv4(h3)
        out = x + unpatchify(patches, c, h, w)
        return out.contiguous(memory_format=torch.channels_last)

    def extra_repr(self) -> str:
        return (
            f"batch_size={self.batch_size}, image={self.height}x{self.width}, "
            f"patch={self.patch_size}, patch_images={self.num_patches}"
        )
