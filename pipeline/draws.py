"""Every random choice of a view, for a whole batch at once: counter-based draws.

A view's parameters (`augment.ViewParams`: crop box, colour jitter and its
order, grayscale, blur, solarise, flip) are a function of (seed, epoch, sample
index, view) and the source image's size, and nothing else: no generator state,
so any backend, worker or rank draws the same numbers for the same sample, in
any order, and a resumed run sees the views it would have seen.

The uniforms come from Philox4x64-10 (Salmon et al., *Parallel random numbers:
as easy as 1, 2, 3*, SC 2011), keyed by (seed, DOMAIN) and counted by
(block, index, epoch, view). Each (sample, view) owns `BLOCKS` counter blocks,
i.e. `SLOTS` uniforms at fixed positions (`SLOT_*`), so a draw never depends on
how many draws came before it; torchvision's RandomResizedCrop loop of up to
ten attempts reads attempt k's scale and ratio from slots k and 10 + k and, once
one fits, its position from two slots of its own (the same distribution as
torchvision's sequential draws: position is independent of the attempt).

Two implementations with one signature, checked equal draw for draw in
tests/test_draws.py:

- `draw_views`: the fast path, NumPy over the batch (Philox vectorised here).
  About 3-6 us per sample on one core (`iecl bench draws`), against ~110 us
  for the per-sample NumPy-generator draws it replaced.
- `draw_views_reference`: one sample at a time in plain Python, its uniforms
  from NumPy's own `np.random.Philox` bit generator: the obviously correct
  version (the PIL reference loader uses it).

`augment.sample_view_params` (torchvision's algorithm on a `numpy.random.Generator`)
stays as the definition of the distributions; tests/test_draws.py checks that
both implementations here follow them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from iecl.pipeline.augment import REFERENCE_CROP, ViewParams, ViewRecipe

#: The second key word: these streams differ from any other Philox use of the same seed.
DOMAIN = 0x1EC1_D4A5_0000_0001
ATTEMPTS = 10  # torchvision's RandomResizedCrop tries
SLOT_SCALE, SLOT_RATIO = 0, ATTEMPTS  # attempt k: slots k and ATTEMPTS + k
SLOT_TOP, SLOT_LEFT = 2 * ATTEMPTS, 2 * ATTEMPTS + 1
SLOT_JITTER, SLOT_FACTORS, SLOT_HUE, SLOT_ORDER = 22, 23, 26, 27  # factors: 3 slots, order: 4
SLOT_GRAYSCALE, SLOT_BLUR, SLOT_SIGMA, SLOT_SOLARIZE, SLOT_FLIP = 31, 32, 33, 34, 35
SLOTS = 36
BLOCKS = SLOTS // 4  # Philox4x64 gives four 64-bit words per block

_M0, _M1 = np.uint64(0xD2E7470EE14C6C93), np.uint64(0xCA5A826395121157)
_W0, _W1 = 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B
_LOW32 = np.uint64(0xFFFFFFFF)
_32, _11 = np.uint64(32), np.uint64(11)


def _mulhilo(m: np.uint64, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) 64-bit words of the 128-bit product m * x, from 32-bit halves."""
    m_lo, m_hi = m & _LOW32, m >> _32
    x_lo, x_hi = x & _LOW32, x >> _32
    lo_lo, lo_hi, hi_lo = x_lo * m_lo, x_lo * m_hi, x_hi * m_lo
    middle = (lo_lo >> _32) + (lo_hi & _LOW32) + (hi_lo & _LOW32)
    high = x_hi * m_hi + (lo_hi >> _32) + (hi_lo >> _32) + (middle >> _32)
    return high, x * m


def philox4x64(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x64-10 of uint64 counters (N, 4) under `key`: uint64 (N, 4).

    The same function as NumPy's `np.random.Philox` (whose generator adds one to
    its counter before each block), tested against it."""
    c0, c1, c2, c3 = (counter[:, k].copy() for k in range(4))
    k0, k1 = key[0] % 2**64, key[1] % 2**64
    with np.errstate(over="ignore"):
        for _ in range(10):
            hi0, lo0 = _mulhilo(_M0, c0)
            hi1, lo1 = _mulhilo(_M1, c2)
            c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
            k0, k1 = (k0 + _W0) % 2**64, (k1 + _W1) % 2**64
    return np.stack([c0, c1, c2, c3], 1)


def to_unit(words: np.ndarray) -> np.ndarray:
    """uint64 words -> float64 uniforms in [0, 1) (their top 53 bits)."""
    return (words >> _11).astype(np.float64) * 2.0**-53


def uniforms(seed: int, epoch: int, indices: np.ndarray, view: int | tuple[int, ...]) -> np.ndarray:
    """float64 (B, SLOTS): the uniforms of `view` of each sample in `indices`;
    (V, B, SLOTS) for a tuple of views (one Philox call: NumPy's per-call cost
    dominates at batch sizes, so both views together take little more than one)."""
    views = np.atleast_1d(np.asarray(view, np.uint64))
    indices = np.asarray(indices, np.int64).reshape(-1)
    counter = np.empty((len(views), len(indices), BLOCKS, 4), np.uint64)
    counter[..., 0] = np.arange(1, BLOCKS + 1, dtype=np.uint64)  # block 0 is Philox's counter start
    counter[..., 1] = indices.astype(np.uint64)[None, :, None]
    counter[..., 2] = np.uint64(epoch % 2**64)
    counter[..., 3] = views[:, None, None]
    words = philox4x64(counter.reshape(-1, 4), (seed, DOMAIN))
    out = to_unit(words).reshape(len(views), len(indices), SLOTS)
    return out if isinstance(view, tuple) else out[0]


def uniforms_reference(seed: int, epoch: int, index: int, view: int) -> np.ndarray:
    """float64 (SLOTS,): one sample's uniforms, from NumPy's own Philox generator."""
    key = np.array([seed % 2**64, DOMAIN], np.uint64)
    counter = np.array([0, index % 2**64, epoch % 2**64, view], np.uint64)
    return to_unit(np.random.Philox(key=key, counter=counter).random_raw(SLOTS))


@dataclass
class ViewDraws:
    """A batch of views' parameters, one row per sample (`ViewParams` as arrays)."""

    box: np.ndarray  # int64 (B, 4): left, top, w, h in source pixels
    jitter: np.ndarray  # bool (B,)
    brightness: np.ndarray  # float64 (B,), multiplicative; 1 = unchanged
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray  # float64 (B,), turns in [-0.5, 0.5]
    order: np.ndarray  # int64 (B, 4): application order of (brightness, contrast, saturation, hue)
    grayscale: np.ndarray  # bool (B,)
    blur_sigma: np.ndarray  # float64 (B,), pixels of the output view; 0 = no blur
    solarize: np.ndarray  # bool (B,)
    flip: np.ndarray  # bool (B,)

    def __len__(self) -> int:
        return len(self.jitter)

    def params(self, i: int) -> ViewParams:
        """Row `i` as the `ViewParams` the PIL reference applies."""
        return ViewParams(
            tuple(int(v) for v in self.box[i]), bool(self.jitter[i]), float(self.brightness[i]),
            float(self.contrast[i]), float(self.saturation[i]), float(self.hue[i]),
            tuple(int(v) for v in self.order[i]), bool(self.grayscale[i]), float(self.blur_sigma[i]),
            bool(self.solarize[i]), bool(self.flip[i]),
        )

    def as_params(self) -> list[ViewParams]:
        return [self.params(i) for i in range(len(self))]

    @classmethod
    def from_params(cls, params: list[ViewParams]) -> ViewDraws:
        return cls(
            box=np.array([p.box for p in params], np.int64).reshape(-1, 4),
            order=np.array([p.order for p in params], np.int64).reshape(-1, 4),
            **{f.name: np.array([getattr(p, f.name) for p in params], _DTYPES[f.name])
               for f in fields(cls) if f.name not in ("box", "order")},
        )

    def take(self, rows: np.ndarray) -> ViewDraws:
        return ViewDraws(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


_DTYPES = {"jitter": bool, "grayscale": bool, "solarize": bool, "flip": bool, "brightness": np.float64,
           "contrast": np.float64, "saturation": np.float64, "hue": np.float64, "blur_sigma": np.float64}


def _fallback(width, height, ratio):
    """torchvision's fallback crop (no attempt fit): central, aspect clamped into range.

    Works on Python ints and on int64 arrays alike."""
    in_ratio = width / height
    w = np.where(in_ratio < ratio[0], width, np.where(in_ratio > ratio[1], np.round(height * ratio[1]), width))
    h = np.where(in_ratio < ratio[0], np.round(width / ratio[0]), height)
    return w.astype(np.int64), h.astype(np.int64)


def draw_views(
    recipe: ViewRecipe, seed: int, epoch: int, view: int, indices: np.ndarray,
    widths: np.ndarray, heights: np.ndarray, size: int,
) -> ViewDraws:
    """`view` (0 anchor, 1 query) of every sample in `indices`, for sources of
    `widths` x `heights` pixels and `size`^2 output views: vectorised."""
    return _draw(uniforms(seed, epoch, indices, view), recipe, widths, heights, size)


def _draw(u: np.ndarray, recipe: ViewRecipe, widths: np.ndarray, heights: np.ndarray, size: int) -> ViewDraws:
    """The views of uniforms `u` (B, SLOTS)."""
    width = np.asarray(widths, np.int64).reshape(-1)
    height = np.asarray(heights, np.int64).reshape(-1)
    batch = len(u)

    # RandomResizedCrop: all ten attempts at once, the first that fits wins.
    lo, hi = recipe.crop_scale
    log_lo, log_hi = math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1])
    area = (width * height).astype(np.float64)[:, None]
    target = area * (lo + (hi - lo) * u[:, SLOT_SCALE : SLOT_SCALE + ATTEMPTS])  # (B, 10)
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, SLOT_RATIO : SLOT_RATIO + ATTEMPTS])
    w_try = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h_try = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w_try > 0) & (w_try <= width[:, None]) & (h_try > 0) & (h_try <= height[:, None])
    first = fits.argmax(1)
    found = fits[np.arange(batch), first]
    rows = np.arange(batch)
    w_fb, h_fb = _fallback(width, height, recipe.crop_ratio)
    w = np.where(found, w_try[rows, first], w_fb)
    h = np.where(found, h_try[rows, first], h_fb)
    top = np.where(found, np.floor(u[:, SLOT_TOP] * (height - h + 1)).astype(np.int64), (height - h) // 2)
    left = np.where(found, np.floor(u[:, SLOT_LEFT] * (width - w + 1)).astype(np.int64), (width - w) // 2)

    jitter = u[:, SLOT_JITTER] < recipe.jitter_prob
    strengths = np.array([recipe.brightness, recipe.contrast, recipe.saturation])
    f_lo, f_hi = np.maximum(0.0, 1 - strengths), 1 + strengths
    factors = np.where(jitter[:, None], f_lo + (f_hi - f_lo) * u[:, SLOT_FACTORS : SLOT_FACTORS + 3], 1.0)
    hue = np.where(jitter, -recipe.hue + 2 * recipe.hue * u[:, SLOT_HUE], 0.0)
    order = np.where(jitter[:, None], np.argsort(u[:, SLOT_ORDER : SLOT_ORDER + 4], axis=1, kind="stable"),
                     np.arange(4))
    s_lo, s_hi = recipe.blur_sigma
    blurred = u[:, SLOT_BLUR] < recipe.blur_prob
    sigma = np.where(blurred, (s_lo + (s_hi - s_lo) * u[:, SLOT_SIGMA]) * size / REFERENCE_CROP, 0.0)
    return ViewDraws(
        box=np.stack([left, top, w, h], 1), jitter=jitter, brightness=factors[:, 0], contrast=factors[:, 1],
        saturation=factors[:, 2], hue=hue, order=order.astype(np.int64),
        grayscale=u[:, SLOT_GRAYSCALE] < recipe.grayscale_prob, blur_sigma=sigma,
        solarize=u[:, SLOT_SOLARIZE] < recipe.solarize_prob, flip=u[:, SLOT_FLIP] < recipe.flip_prob,
    )


def _params_reference(u: np.ndarray, recipe: ViewRecipe, width: int, height: int, size: int) -> ViewParams:
    """One view from its uniforms, torchvision's algorithm step by step."""
    box = None
    log_lo, log_hi = math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1])
    lo, hi = recipe.crop_scale
    for attempt in range(ATTEMPTS):
        # NumPy's ufuncs, not math's, so both paths round exp identically.
        target = float(width * height) * (lo + (hi - lo) * u[SLOT_SCALE + attempt])
        aspect = np.exp(log_lo + (log_hi - log_lo) * u[SLOT_RATIO + attempt])
        w = int(np.round(np.sqrt(target * aspect)))
        h = int(np.round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(np.floor(u[SLOT_TOP] * (height - h + 1)))
            left = int(np.floor(u[SLOT_LEFT] * (width - w + 1)))
            box = (left, top, w, h)
            break
    if box is None:
        w, h = (int(v) for v in _fallback(width, height, recipe.crop_ratio))
        box = ((width - w) // 2, (height - h) // 2, w, h)
    jitter = bool(u[SLOT_JITTER] < recipe.jitter_prob)
    factors, hue, order = [1.0, 1.0, 1.0], 0.0, (0, 1, 2, 3)
    if jitter:
        for k, s in enumerate((recipe.brightness, recipe.contrast, recipe.saturation)):
            f_lo, f_hi = max(0.0, 1 - s), 1 + s
            factors[k] = float(f_lo + (f_hi - f_lo) * u[SLOT_FACTORS + k])
        hue = float(-recipe.hue + 2 * recipe.hue * u[SLOT_HUE])
        order = tuple(sorted(range(4), key=lambda k: u[SLOT_ORDER + k]))
    sigma = 0.0
    if u[SLOT_BLUR] < recipe.blur_prob:
        s_lo, s_hi = recipe.blur_sigma
        sigma = float((s_lo + (s_hi - s_lo) * u[SLOT_SIGMA]) * size / REFERENCE_CROP)
    return ViewParams(
        box, jitter, *factors, hue, order, bool(u[SLOT_GRAYSCALE] < recipe.grayscale_prob), sigma,
        bool(u[SLOT_SOLARIZE] < recipe.solarize_prob), bool(u[SLOT_FLIP] < recipe.flip_prob),
    )


def draw_views_reference(
    recipe: ViewRecipe, seed: int, epoch: int, view: int, indices: np.ndarray,
    widths: np.ndarray, heights: np.ndarray, size: int,
) -> ViewDraws:
    """`draw_views`, one sample at a time (the reference: same signature, same numbers)."""
    params = [
        _params_reference(uniforms_reference(seed, epoch, int(i), view), recipe, int(w), int(h), size)
        for i, w, h in zip(np.asarray(indices).reshape(-1), np.asarray(widths).reshape(-1),
                           np.asarray(heights).reshape(-1))
    ]
    return ViewDraws.from_params(params)


def draw_two_views(recipes: tuple[ViewRecipe, ViewRecipe], seed: int, epoch: int, indices: np.ndarray,
                   widths: np.ndarray, heights: np.ndarray, size: int, *, reference: bool = False
                   ) -> tuple[ViewDraws, ViewDraws]:
    """(anchor, query) draws of a batch: what every loader backend calls."""
    if reference:
        return tuple(draw_views_reference(recipe, seed, epoch, view, indices, widths, heights, size)
                     for view, recipe in enumerate(recipes))
    both = uniforms(seed, epoch, indices, (0, 1))  # (2, B, SLOTS)
    return tuple(_draw(u, recipe, widths, heights, size) for u, recipe in zip(both, recipes))
