"""Two-view augmentation recipes, and their PIL implementation (the reference).

A recipe is data: one `ViewRecipe` per view (anchor, query), so every loader
backend (PIL here; DALI and FFCV behind the same interface) builds the same
augmentations from the same numbers. The PIL path follows torchvision's PIL
semantics (RandomResizedCrop's sampling loop and fallback, ColorJitter's
random order of the four adjustments, PIL's ImageEnhance and HSV hue shift),
without depending on torchvision.

`sample_view_params` is torchvision's algorithm on a `numpy.random.Generator`:
the definition of the distributions (and what `iecl`'s evaluation views draw
from). The loaders draw the same distributions for a whole batch at once,
counter-based (`pipeline/draws.py`): a sample's views depend on (seed, epoch,
sample index, view) alone, not on which worker made them or on what came
before, which is what makes data order and augmentations identical after a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

#: Blur sigmas in recipes are for 224-pixel crops (MoCo-v2's 0.1-2.0); they are
#: scaled with the crop size so a 96-pixel smoke run blurs as much, relatively.
REFERENCE_CROP = 224


@dataclass(frozen=True)
class ViewRecipe:
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    flip_prob: float = 0.5


_MOCOV2 = ViewRecipe()
_SIMCLR = ViewRecipe(crop_scale=(0.08, 1.0), brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
_BYOL = ViewRecipe(crop_scale=(0.08, 1.0), brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)

#: name -> (anchor view, query view)
RECIPES: dict[str, tuple[ViewRecipe, ViewRecipe]] = {
    "mocov2": (_MOCOV2, _MOCOV2),  # Chen et al. 2020, "Improved baselines" (MoCo v2)
    "simclr": (_SIMCLR, _SIMCLR),  # Chen et al. 2020, SimCLR, colour strength 0.8
    "byol": (  # Grill et al. 2020, Table 6: asymmetric blur and solarisation
        replace(_BYOL, blur_prob=1.0),
        replace(_BYOL, blur_prob=0.1, solarize_prob=0.2),
    ),
}


def get_recipe(name: str, crop_scale: tuple[float, float] | None = None) -> tuple[ViewRecipe, ViewRecipe]:
    if name not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {name!r}; choose one of {sorted(RECIPES)}")
    views = RECIPES[name]
    if crop_scale is not None:
        views = tuple(replace(v, crop_scale=tuple(crop_scale)) for v in views)
    return views


def sample_crop(
    rng: np.random.Generator, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (left, top, w, h) in pixels."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: the largest central crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass(frozen=True)
class ViewParams:
    """Every random choice of one view, drawn before any pixel is touched, so a
    backend that cannot share the reference's code (DALI, FFCV + the device)
    applies exactly the same crop, jitter, blur and flip to the same sample."""

    box: tuple[int, int, int, int]  # crop (left, top, w, h) in source pixels
    jitter: bool
    brightness: float  # multiplicative factors, 1 = unchanged
    contrast: float
    saturation: float
    hue: float  # shift in turns, in [-0.5, 0.5]
    order: tuple[int, int, int, int]  # application order of (brightness, contrast, saturation, hue)
    grayscale: bool
    blur_sigma: float  # pixels of the output view; 0 = no blur
    solarize: bool
    flip: bool


def sample_view_params(
    rng: np.random.Generator, recipe: ViewRecipe, width: int, height: int, size: int
) -> ViewParams:
    """Draw one view's parameters for a `width` x `height` source and `size`^2 output."""
    box = sample_crop(rng, width, height, recipe.crop_scale, recipe.crop_ratio)
    jitter = bool(rng.uniform() < recipe.jitter_prob)
    factors, hue, order = (1.0, 1.0, 1.0), 0.0, (0, 1, 2, 3)
    if jitter:
        strengths = (recipe.brightness, recipe.contrast, recipe.saturation)
        factors = tuple(float(rng.uniform(max(0.0, 1 - s), 1 + s)) for s in strengths)
        hue = float(rng.uniform(-recipe.hue, recipe.hue))
        order = tuple(int(k) for k in rng.permutation(4))
    grayscale = bool(rng.uniform() < recipe.grayscale_prob)
    sigma = 0.0
    if rng.uniform() < recipe.blur_prob:
        sigma = float(rng.uniform(*recipe.blur_sigma)) * size / REFERENCE_CROP
    solarize = bool(rng.uniform() < recipe.solarize_prob)
    flip = bool(rng.uniform() < recipe.flip_prob)
    return ViewParams(box, jitter, *factors, hue, order, grayscale, sigma, solarize, flip)


def _adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate hue by `shift` turns (torchvision's PIL adjust_hue)."""
    h, s, v = img.convert("HSV").split()
    h_shifted = (np.asarray(h, np.uint8) + np.uint8(round(shift * 255) % 256)).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(h_shifted, "L"), s, v)).convert("RGB")


def color_jitter(img: Image.Image, params: ViewParams) -> Image.Image:
    """torchvision's ColorJitter on PIL images: the four adjustments in `params.order`."""
    ops = (
        lambda im: ImageEnhance.Brightness(im).enhance(params.brightness),
        lambda im: ImageEnhance.Contrast(im).enhance(params.contrast),
        lambda im: ImageEnhance.Color(im).enhance(params.saturation),
        lambda im: _adjust_hue(im, params.hue),
    )
    for k in params.order:
        img = ops[k](img)
    return img


def apply_view(img: Image.Image, params: ViewParams, size: int) -> np.ndarray:
    """The reference implementation of a view: uint8 (size, size, 3)."""
    left, top, w, h = params.box
    view = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    if params.jitter:
        view = color_jitter(view, params)
    if params.grayscale:
        view = view.convert("L").convert("RGB")
    if params.blur_sigma > 0:
        view = view.filter(ImageFilter.GaussianBlur(radius=params.blur_sigma))  # PIL's radius is the std dev
    if params.solarize:
        view = ImageOps.solarize(view, threshold=128)
    if params.flip:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(view, dtype=np.uint8)


def view_rngs(seed: int, epoch: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Generators for sample `index`'s two views in `epoch` (the evaluation's
    augmented views; the training loaders use `pipeline.draws` instead)."""
    return tuple(np.random.default_rng([seed, epoch, index, view]) for view in range(2))
