"""View preparation: uint8 NHWC views -> normalised, channels-last tensors.

The pure-PyTorch reference is the data contract's own normalisation
(`pipeline.views.normalize`, which the evaluation loaders use too), bound
here under the name the kernel tests pair with the fused Triton kernel of
the same signature (kernels/view_prep_triton.py). Permuting an NHWC tensor
to NCHW is free and already has channels-last strides, so the encoder gets
its preferred layout without a copy beyond the one the normalisation writes.
"""

from __future__ import annotations

import torch
from torch import nn

from iecl.pipeline.views import normalize as prepare_view_reference

IMPLS = ("reference", "triton")
__all__ = ["IMPLS", "ViewPrep", "prepare_view_reference", "view_prep_impl"]


def view_prep_impl(impl: str, device: torch.device):
    """The view-preparation function for `impl` ("reference" or "triton") on
    `device`: the Triton kernel where it can run, else the reference, with one
    warning saying why."""
    if impl == "reference":
        return prepare_view_reference
    if impl not in IMPLS:
        raise ValueError(f"view_prep impl must be one of {IMPLS}, got {impl!r}")
    from iecl.kernels._triton import triton_available, warn_fallback

    ok, reason = triton_available(device)
    if not ok:
        warn_fallback("kernels.view_prep=triton", reason)
        return prepare_view_reference
    from iecl.kernels.view_prep_triton import prepare_view_triton  # imports triton

    return prepare_view_triton


class ViewPrep(nn.Module):
    """View preparation as a module: uint8 (B, H, W, C) -> (x - mean) / std as
    `dtype`, channels-last, by `impl` ("reference" or "triton", chosen per
    device on first use). `mean` and `std` are buffers, so they move with the
    model, and not persistent, so checkpoints do not hold them. Methods read
    `mean`, `std` and `dtype` when they fuse the preparation into their own
    first kernel (SAIB's)."""

    def __init__(self, impl: str, mean, std, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"view_prep impl must be one of {IMPLS}, got {impl!r}")
        self.impl, self.dtype = impl, dtype
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32), persistent=False)
        self._fns: dict[torch.device, object] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fn = self._fns.get(images.device)
        if fn is None:
            fn = self._fns[images.device] = view_prep_impl(self.impl, images.device)
        return fn(images, self.mean, self.std, self.dtype)

    def extra_repr(self) -> str:
        return f"impl={self.impl}, dtype={self.dtype}"
