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
from torch import nn

from iecl.kernels._triton import triton_available, warn_fallback
from iecl.kernels.saib_reference import (
    SAIBParams,
    compiled_saib_reference,
    saib_reference,
)
from iecl.kernels.view_prep import prepare_view_reference

#: "reference": this module's code; "triton": the fused kernels (kernels/saib_function.py),
#: falling back to the reference with one warning where Triton cannot run;
#: "compile": torch.compile of the functional reference (kernels/saib_reference.py).
IMPLS = ("reference", "triton", "compile")


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
        impl: str = "reference",
    ) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"SAIB impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl
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

    def forward(self, x: torch.Tensor, prepare=None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, H, W), channels-last. Or the loader's uint8
        (B, H, W, 3) query view with its `prepare` (a kernels.view_prep.ViewPrep):
        the view preparation is then SAIB's first load (fused with impl="triton")."""
        if x.dtype == torch.uint8:
            if prepare is None:
                raise ValueError("SAIB on a uint8 view needs the view preparation (prepare=ViewPrep)")
            return self.forward_uint8(x, prepare.mean, prepare.std, prepare.dtype)
        return self._forward_prepared(x)

    def _forward_prepared(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if (b, c, h, w) != (self.batch_size, self.channels, self.height, self.width):
            raise ValueError(
                f"SAIB was built for batches of shape {(self.batch_size, self.channels, self.height, self.width)}, "
                f"got {tuple(x.shape)}; its weights depend on the per-device batch size"
            )
        return self._forward_impl(x)

    def forward_uint8(
        self, query: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """uint8 (B, H, W, 3) query view -> SAIB((query - mean) / std as `dtype`).
        With impl="triton" the normalisation is fused into SAIB's first kernel."""
        if query.dtype != torch.uint8 or tuple(query.shape) != (self.batch_size, self.height, self.width, self.channels):
            raise ValueError(
                f"SAIB.forward_uint8 expects uint8 {(self.batch_size, self.height, self.width, self.channels)}, "
                f"got {query.dtype} {tuple(query.shape)}"
            )
        if self.impl == "triton" and self._triton_runs(query.device):
            from iecl.kernels.saib_function import saib_triton_uint8  # imports triton

            return saib_triton_uint8(query, mean, std, dtype, self.functional_params(), self.patch_size,
                                     *self._bn_config()).to(dtype)
        return self._forward_prepared(prepare_view_reference(query, mean, std, dtype))

    def functional_params(self) -> SAIBParams:
        """Parameters and BatchNorm buffers for the functional implementations."""
        convs = (self.conv1, self.conv2, self.conv3, self.conv4)
        return SAIBParams(
            self.pos_embed,
            tuple(conv[0].weight for conv in convs),
            tuple(conv[1].weight for conv in convs),
            tuple(conv[1].bias for conv in convs),
            tuple(conv[1].running_mean for conv in convs),
            tuple(conv[1].running_var for conv in convs),
            tuple(conv[1].num_batches_tracked for conv in convs),
        )

    def _bn_config(self) -> tuple[bool, float, float]:
        bn = self.conv1[1]
        return self.training, bn.momentum, bn.eps

    def _triton_runs(self, device: torch.device) -> bool:
        ok, reason = triton_available(device)
        if not ok:
            warn_fallback("SAIB impl='triton'", reason)
        return ok

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        """The one reference is kernels/saib_reference.py's function, on this
        module's parameters and BatchNorm buffers; "compile" compiles it and
        "triton" runs the fused kernels that are tested against it. The output
        has the input's dtype (the compute dtype): under autocast the fp32
        positional embedding would promote it, and the encoders would see an
        fp32 query beside a bf16 anchor (a second compiled graph; the stem's
        convolution casts to bf16 under autocast either way)."""
        if self.impl == "triton" and self._triton_runs(x.device):
            from iecl.kernels.saib_function import saib_triton  # imports triton

            return saib_triton(x, self.functional_params(), self.patch_size, *self._bn_config()).to(x.dtype)
        fn = compiled_saib_reference() if self.impl == "compile" else saib_reference
        return fn(x, self.functional_params(), self.patch_size, *self._bn_config()).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"batch_size={self.batch_size}, image={self.height}x{self.width}, "
            f"patch={self.patch_size}, patch_images={self.num_patches}, impl={self.impl}"
        )
