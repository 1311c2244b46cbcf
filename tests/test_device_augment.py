"""Batched device augmentation (pipeline/device_augment.py) against the PIL reference.

Each test builds views whose crop box covers the whole image at its own size,
so `apply_view` leaves the pixels untouched except for the operation under
test. The torch path follows PIL's arithmetic step by step (truncating blends,
fixed-point luma, PIL's own HSV tables, its three-pass box blur), so on a CPU
it agrees exactly; the bounds below leave room for a grey level of float
rounding on other devices.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from iecl.pipeline.augment import (
    RECIPES,
    ViewParams,
    apply_view,
    sample_view_params,
    view_rngs,
)
from iecl.pipeline.device_augment import augment_batch, pil_box_kernel, stack_params

SIZE = 24
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _images(seed: int = 0) -> np.ndarray:
    """8 images (SIZE x SIZE): 4 smooth with mild noise (like photos), 4 pure noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    smooth = np.stack([np.asarray(Image.fromarray(c).resize((SIZE, SIZE), Image.BILINEAR)) for c in coarse])
    smooth = np.clip(smooth.astype(int) + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
    return np.concatenate([smooth, rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)])


IDENTITY = ViewParams((0, 0, SIZE, SIZE), False, 1.0, 1.0, 1.0, 0.0, (0, 1, 2, 3), False, 0.0, False, False)


def _compare(params: list[ViewParams], device: str, seed: int = 0) -> np.ndarray:
    """|torch - PIL| per pixel and channel, int (B, H, W, 3)."""
    images = _images(seed)
    reference = np.stack([apply_view(Image.fromarray(im), p, SIZE) for im, p in zip(images, params)])
    views = torch.from_numpy(images).to(device)
    out = augment_batch(views, stack_params(params, device))
    assert out.dtype == torch.uint8 and out.shape == views.shape and out.device == views.device
    assert out.is_contiguous()
    return np.abs(out.cpu().numpy().astype(int) - reference.astype(int))


def _assert_close(diff: np.ndarray, mean: float = 0.05, worst: int = 2) -> None:
    assert diff.mean() < mean, f"mean |torch - PIL| = {diff.mean():.3f}"
    assert diff.max() <= worst, f"max |torch - PIL| = {diff.max()}"


def _jitter(k: int, factor: float = 1.0, hue: float = 0.0) -> ViewParams:
    """Only adjustment k (0 brightness, 1 contrast, 2 saturation, 3 hue) differs from 1 / 0."""
    order = (k,) + tuple(j for j in range(4) if j != k)
    factors = [1.0, 1.0, 1.0]
    if k < 3:
        factors[k] = factor
    return replace(IDENTITY, jitter=True, brightness=factors[0], contrast=factors[1], saturation=factors[2],
                   hue=hue, order=order)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [0, 1, 2], ids=["brightness", "contrast", "saturation"])
def test_blends_match_pil(device, op):
    factors = np.linspace(0.1, 1.9, 8)  # below and above 1: PIL truncates, and clips when extrapolating
    _assert_close(_compare([_jitter(op, float(f)) for f in factors], device))


@pytest.mark.parametrize("device", DEVICES)
def test_hue_matches_pil(device):
    # PIL quantises H and S to uint8 on the way through HSV, even for a zero shift;
    # the torch path uses PIL's own conversion tables, so this bound need not be loose.
    shifts = [-0.5, -0.31, -0.1, -0.004, 0.0, 0.05, 0.2, 0.49]
    _assert_close(_compare([_jitter(3, hue=h) for h in shifts], device))


@pytest.mark.parametrize("device", DEVICES)
def test_jitter_order_matters_and_matches(device):
    rng = np.random.default_rng(4)
    params = [
        replace(IDENTITY, jitter=True, brightness=float(rng.uniform(0.5, 1.5)), contrast=float(rng.uniform(0.5, 1.5)),
                saturation=float(rng.uniform(0.5, 1.5)), hue=float(rng.uniform(-0.2, 0.2)),
                order=tuple(int(k) for k in rng.permutation(4)))
        for _ in range(8)
    ]
    _assert_close(_compare(params, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "change",
    [
        {"grayscale": True},
        {"solarize": True},
        {"flip": True},
    ],
    ids=["grayscale", "solarize", "flip"],
)
def test_pointwise_ops_match_pil(device, change):
    _assert_close(_compare([replace(IDENTITY, **change)] * 8, device), mean=0.01, worst=1)


@pytest.mark.parametrize("device", DEVICES)
def test_blur_matches_pil_per_sample_sigma(device):
    # Different radii in one batch (including none): one padded kernel width for all.
    sigmas = [0.0, 0.1, 0.5, 0.9, 1.3, 2.0, 3.1, 0.0]
    diff = _compare([replace(IDENTITY, blur_sigma=s) for s in sigmas], device)
    _assert_close(diff)
    assert diff[0].max() == 0 and diff[-1].max() == 0  # sigma 0 is the identity


def test_blur_kernel_is_normalised_and_widens_with_sigma():
    widths = [len(pil_box_kernel(s)) for s in (0.0, 0.5, 2.0, 4.0)]
    assert widths[0] == 1 and widths == sorted(widths)
    for s in (0.3, 1.0, 2.5):
        k = pil_box_kernel(s)
        assert k.sum() == pytest.approx(1.0) and np.allclose(k, k[::-1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["mocov2", "simclr", "byol"])
def test_random_recipe_batch_matches_pil(device, recipe):
    params = []
    for index in range(8):
        for view, rng in enumerate(view_rngs(3, 0, index)):
            drawn = sample_view_params(rng, RECIPES[recipe][view], SIZE, SIZE, SIZE)
            params.append(replace(drawn, box=(0, 0, SIZE, SIZE)))
    params = params[::2] if recipe != "byol" else params[1::2]  # byol's query view: solarisation
    _assert_close(_compare(params, device, seed=1))


@pytest.mark.parametrize("device", DEVICES)
def test_identity_params_change_nothing(device):
    images = torch.from_numpy(_images(2)).to(device)
    out = augment_batch(images, stack_params([IDENTITY] * len(images), device))
    assert torch.equal(out, images)


def test_stack_params_plans_on_the_host():
    params = [IDENTITY, _jitter(3, hue=0.1), replace(IDENTITY, blur_sigma=1.0), _jitter(0, 1.2)]
    stacked = stack_params(params, "cpu")
    assert stacked["order"].tolist()[0] == [4, 4, 4, 4]  # not jittered: no adjustment at any position
    assert stacked["hue_at_0"].tolist() == [1] and stacked["hue_at_3"].tolist() == [3]
    assert stacked["blurred"].tolist() == [2] and stacked["blur_kernel"].shape[0] == 1
    assert stacked["hue_shift"][1].item() == round(0.1 * 255)


def test_rejects_other_inputs():
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(torch.zeros(2, 4, 4, 3), stack_params([IDENTITY] * 2, "cpu"))
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), stack_params([IDENTITY] * 2, "cpu"))
