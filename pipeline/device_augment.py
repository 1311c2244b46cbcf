"""The photometric half of a view, batched in PyTorch on the training device.

Backends that crop and decode on the CPU (FFCV) hand uint8 NHWC crops to the
device; this module applies the rest of a recipe there, for a whole batch at
once, with each sample's own `ViewParams` (drawn by `sample_view_params`, the
same numbers the PIL reference uses). It reproduces PIL's arithmetic, not just
its intent, so a device view equals the reference's to a grey level or so:

- brightness, contrast, saturation: `Image.blend(degenerate, image, factor)`,
  which truncates to uint8 after each step; contrast's grey is the rounded mean
  of the "L" image, saturation's the per-pixel "L" value;
- "L" (grayscale and the degenerate images above): ITU-R 601-2 luma in PIL's
  fixed point, `(19595 R + 38470 G + 7471 B + 2**15) >> 16`;
- hue: PIL's RGB -> HSV with its uint8 quantisation of H and S, the shift added
  modulo 256, and PIL's HSV -> RGB (torchvision's PIL `adjust_hue`); the
  quantisation is applied even for a zero shift, as the reference does;
- blur: `ImageFilter.GaussianBlur` is not a sampled Gaussian but three passes of
  a box filter with fractional end weights (Pillow's BoxBlur.c), each pass
  rounded to uint8 and edge-replicated, horizontal passes first. We do the
  same passes as per-sample separable convolutions: every sample's box kernel
  is padded with zero weights to the batch's largest radius; sigma 0 gives a
  one-tap identity kernel;
- solarize (x >= 128 -> 255 - x) and the horizontal flip are exact.

Everything is elementwise or a depthwise convolution over the batch, with no
loop over samples and no host-device synchronisation; the loop over the four
jitter positions computes each position's candidate and selects per sample.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from iecl.pipeline.augment import ViewParams
from iecl.pipeline.draws import ViewDraws

#: Box passes of PIL's GaussianBlur (ImagingGaussianBlur's `passes`).
BLUR_PASSES = 3
_NO_OP = 4  # jitter "operation" of samples that are not jittered: identity


def pil_box_radius(sigma: float, passes: int = BLUR_PASSES) -> float:
    """Pillow's `_gaussian_blur_radius`: the fractional box radius whose `passes`
    box blurs have variance sigma^2 (computed in float32, as in C)."""
    sigma2 = np.float32(sigma) * np.float32(sigma) / np.float32(passes)
    length = np.float32(math.sqrt(12.0 * float(sigma2) + 1.0))
    whole = np.float32(math.floor((float(length) - 1.0) / 2.0))
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
    frac = frac / (6 * (sigma2 - (whole + 1) * (whole + 1)))
    return float(whole + frac)


def pil_box_kernel(sigma: float) -> np.ndarray:
    """One pass's 1-D weights for PIL's blur of std `sigma`: (2r + 3,) with r the
    integer box radius; full weight inside, the fractional weight at +-(r + 1)."""
    if sigma <= 0:
        return np.ones(1, np.float64)
    radius = pil_box_radius(sigma)
    whole = int(radius)
    inner = 1.0 / (2 * radius + 1)
    edge = (1.0 - (2 * whole + 1) * inner) / 2
    return np.array([edge] + [inner] * (2 * whole + 1) + [edge])


def pil_box_kernels(sigmas: np.ndarray) -> np.ndarray:
    """`pil_box_kernel` of every sigma (> 0) at once: float64 (n, 2R + 1), each
    row centred and zero-padded to the largest half-width R (float32 radius
    arithmetic, as Pillow's C and the scalar version)."""
    sigmas = np.asarray(sigmas, np.float64)
    if not len(sigmas):
        return np.zeros((0, 1))
    sigma2 = sigmas.astype(np.float32) * sigmas.astype(np.float32) / np.float32(BLUR_PASSES)
    length = np.sqrt(12.0 * sigma2.astype(np.float64) + 1.0).astype(np.float32)
    whole = np.floor((length.astype(np.float64) - 1.0) / 2.0).astype(np.float32)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
    frac = frac / (6 * (sigma2 - (whole + 1) * (whole + 1)))
    radius = (whole + frac).astype(np.float64)
    taps = radius.astype(np.int64)  # the integer radius of each row
    inner = 1.0 / (2 * radius + 1)
    edge = (1.0 - (2 * taps + 1) * inner) / 2
    half = int(taps.max()) + 1
    offset = np.abs(np.arange(-half, half + 1))[None, :]  # (1, 2R + 1)
    return np.where(offset <= taps[:, None], inner[:, None], np.where(offset == taps[:, None] + 1, edge[:, None], 0.0))


def stack_params(params: list[ViewParams] | ViewDraws, device) -> dict[str, torch.Tensor]:
    """Per-sample tensors of a batch's view parameters (a `ViewDraws`, or a list
    of `ViewParams`), on `device`.

    jitter, grayscale, solarize, flip: bool (B,); brightness, contrast,
    saturation: float32 (B,); hue_shift: int64 (B,), the shift in PIL's uint8
    hue levels; order: int64 (B, 4), the adjustment at each jitter position
    (0 brightness, 1 contrast, 2 saturation, 3 hue; 4 = none, for samples
    without jitter). Work that only some samples need is planned here, on the
    host, so the device never has to be asked which: hue_at_{p}: int64 (n_p,),
    the samples whose hue step is at position p; blurred: int64 (n_b,), the
    samples with sigma > 0, and blur_kernel: float32 (n_b, 2R + 1), their box
    pass weights centred and zero-padded to the largest half-width R.
    """
    draws = params if isinstance(params, ViewDraws) else ViewDraws.from_params(params)
    order = np.where(draws.jitter[:, None], draws.order, _NO_OP).astype(np.int64)
    blurred = np.flatnonzero(draws.blur_sigma > 0)
    # torchvision's PIL adjust_hue: uint8(round(shift * 255) % 256); np.round halves to even, as Python's round
    hue_shift = np.round(draws.hue * 255).astype(np.int64) % 256
    host = {
        "brightness": torch.from_numpy(draws.brightness.astype(np.float32)),
        "contrast": torch.from_numpy(draws.contrast.astype(np.float32)),
        "saturation": torch.from_numpy(draws.saturation.astype(np.float32)),
        "hue_shift": torch.from_numpy(hue_shift),
        "order": torch.from_numpy(order),
        "jitter": torch.from_numpy(draws.jitter.astype(bool)),
        "grayscale": torch.from_numpy(draws.grayscale.astype(bool)),
        "solarize": torch.from_numpy(draws.solarize.astype(bool)),
        "flip": torch.from_numpy(draws.flip.astype(bool)),
        "blurred": torch.from_numpy(blurred.astype(np.int64)),
        "blur_kernel": torch.from_numpy(pil_box_kernels(draws.blur_sigma[blurred]).astype(np.float32)),
        **{f"hue_at_{p}": torch.from_numpy(np.flatnonzero(order[:, p] == 3)) for p in range(4)},
    }
    device = torch.device(device)
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in host.items()}


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> "L" on integer-valued floats (B, H, W, 3) -> (B, H, W), exact."""
    r, g, b = x.unbind(-1)
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, x, factor), truncated to uint8 levels."""
    return torch.floor((degenerate + factor * (x - degenerate)).clamp_(0, 255))


_HSV_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _hsv_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's own RGB -> (H, S) and HSV -> RGB conversions of all 2^24 colours,
    uint8 (2^24, 2) and (2^24, 3), made once per device (80 MB, ~2 s on a CPU).

    Pillow's Convert.c mixes float and double arithmetic; an arithmetic
    re-implementation in torch matched it exactly only with float64 steps in
    the right places and was ~10x slower on a CPU than these two gathers.
    """
    device = torch.device(device)
    if device not in _HSV_TABLES:
        codes = np.arange(1 << 24, dtype=np.uint32)
        every = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], -1).astype(np.uint8).tobytes()
        to_hsv = np.asarray(Image.frombytes("RGB", (4096, 4096), every).convert("HSV")).reshape(-1, 3)[:, :2]
        to_rgb = np.asarray(Image.frombytes("HSV", (4096, 4096), every).convert("RGB")).reshape(-1, 3)
        _HSV_TABLES[device] = (
            torch.from_numpy(np.array(to_hsv)).to(device),
            torch.from_numpy(np.array(to_rgb)).to(device),
        )
    return _HSV_TABLES[device]


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """PIL's convert("HSV"), uint8 hue + `shift` (B, 1, 1) mod 256, convert("RGB").

    x: (B, H, W, 3) integer-valued floats. The quantisation to PIL's uint8 H and
    S happens even for a zero shift, as in the reference.
    """
    to_hsv, to_rgb = _hsv_tables(x.device)
    rgb = x.to(torch.int32)
    r, g, b = rgb.unbind(-1)
    hs = to_hsv[(r << 16) | (g << 8) | b].to(torch.int32)  # (B, H, W, 2)
    hue = (hs[..., 0] + shift.to(torch.int32)) & 255
    value = torch.maximum(torch.maximum(r, g), b)
    return to_rgb[(hue << 16) | (hs[..., 1] << 8) | value].to(x.dtype)


def _color_jitter(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The four adjustments, each sample in its own order (no-op where not jittered).

    At each position the three blends run on the whole batch (factor 1, an exact
    identity, for samples whose step there is something else) and the hue step
    on just the samples that have it there.
    """
    factors = torch.stack((params["brightness"], params["contrast"], params["saturation"]), 1)  # (B, 3)
    for position in range(4):
        op = params["order"][:, position]  # (B,)
        grey = _luma(x)  # (B, H, W)
        mean = torch.floor(grey.mean(dim=(1, 2), dtype=torch.float64) + 0.5).float()  # ImageStat's mean, rounded
        op3 = op.view(-1, 1, 1)
        degenerate = torch.where(op3 == 1, mean.view(-1, 1, 1), torch.where(op3 == 2, grey, 0.0))  # (B, H, W)
        factor = torch.where(op < 3, factors.gather(1, op.clamp(max=2).unsqueeze(1)).squeeze(1), 1.0)
        x = _blend(degenerate.unsqueeze(-1), x, factor.view(-1, 1, 1, 1))
        index = params[f"hue_at_{position}"]
        if index.numel():  # a host-side size: no synchronisation
            shift = params["hue_shift"].index_select(0, index).view(-1, 1, 1)
            x = x.index_copy(0, index, _adjust_hue(x.index_select(0, index), shift))
    return x


def _box_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """PIL's GaussianBlur: BLUR_PASSES rounded box passes along W, then along H.

    x: (B, H, W, 3) integer-valued floats; kernel: (B, 2R + 1) per-sample weights.
    """
    batch, height, width, _ = x.shape
    half = kernel.shape[1] // 2
    planes = x.permute(0, 3, 1, 2).reshape(1, batch * 3, height, width)  # (1, B*3, H, W)
    taps = kernel.repeat_interleave(3, dim=0)  # (B*3, 2R+1), one row per channel
    along_w, along_h = taps.view(batch * 3, 1, 1, -1), taps.view(batch * 3, 1, -1, 1)
    for weight, pad in ((along_w, (half, half, 0, 0)), (along_h, (0, 0, half, half))):
        for _ in range(BLUR_PASSES):
            planes = F.conv2d(F.pad(planes, pad, mode="replicate"), weight, groups=batch * 3)
            planes = torch.floor(planes + 0.5)
    return planes.view(batch, 3, height, width).permute(0, 2, 3, 1)


def augment_batch(views_u8_nhwc: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Colour jitter, grayscale, blur, solarize and flip of a uint8 (B, H, W, 3)
    batch, per sample as in `params` (from `stack_params`); uint8 NHWC out."""
    if views_u8_nhwc.dtype != torch.uint8 or views_u8_nhwc.dim() != 4 or views_u8_nhwc.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3) views, got {views_u8_nhwc.dtype} {tuple(views_u8_nhwc.shape)}")
    assert params["order"].shape[0] == views_u8_nhwc.shape[0], "one ViewParams per view"
    x = views_u8_nhwc.float()
    x = _color_jitter(x, params)
    x = torch.where(params["grayscale"].view(-1, 1, 1, 1), _luma(x).unsqueeze(-1).expand_as(x), x)
    blurred = params["blurred"]
    if blurred.numel():
        x = x.index_copy(0, blurred, _box_blur(x.index_select(0, blurred), params["blur_kernel"]))
    x = torch.where(params["solarize"].view(-1, 1, 1, 1) & (x >= 128), 255.0 - x, x)
    x = torch.where(params["flip"].view(-1, 1, 1, 1), x.flip(2), x)
    return x.clamp_(0, 255).to(torch.uint8).contiguous()
