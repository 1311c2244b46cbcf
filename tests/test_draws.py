"""The batch draws (pipeline/draws.py): Philox as NumPy computes it, the fast
path equal to its per-sample reference draw for draw, and both following the
distributions of torchvision's algorithm (augment.sample_view_params on a
NumPy generator): crop scale, ratio and position, the jitter factors, hue and
order, and the rates of jitter, grayscale, blur, solarisation and flips."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import numpy as np
import pytest

from iecl.pipeline import draws
from iecl.pipeline.augment import RECIPES, ViewRecipe, sample_view_params, view_rngs
from iecl.pipeline.draws import (
    ViewDraws,
    draw_two_views,
    draw_views,
    draw_views_reference,
)

#: Every step half on, BYOL's solarisation included: each rate is measurable.
EVERY_STEP = ViewRecipe(crop_scale=(0.08, 1.0), jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
                        hue=0.1, grayscale_prob=0.2, blur_prob=0.5, solarize_prob=0.2, flip_prob=0.5)
SIZE = 96


def _equal(a: ViewDraws, b: ViewDraws) -> bool:
    return all(np.array_equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(ViewDraws))


def test_philox_is_numpys():
    rng = np.random.default_rng(5)
    for _ in range(4):
        key = tuple(int(k) for k in rng.integers(0, 2**63, 2))
        start = rng.integers(0, 2**62, 4).astype(np.uint64)
        ours = draws.philox4x64(np.stack([start + np.uint64(1 + b) * np.array([1, 0, 0, 0], np.uint64)
                                          for b in range(3)]), key)
        theirs = np.random.Philox(key=np.array(key, np.uint64), counter=start).random_raw(12).reshape(3, 4)
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("recipe", [*(r for pair in RECIPES.values() for r in pair), EVERY_STEP])
def test_fast_path_equals_reference(recipe):
    rng = np.random.default_rng(1)
    n = 600
    indices = rng.integers(0, 2**40, n)
    widths, heights = rng.integers(1, 900, n), rng.integers(1, 900, n)
    widths[:40], heights[40:80] = 1, 2  # extreme aspects: torchvision's fallback crop
    for view in (0, 1):
        fast = draw_views(recipe, 7, 3, view, indices, widths, heights, SIZE)
        assert _equal(fast, draw_views_reference(recipe, 7, 3, view, indices, widths, heights, SIZE))
    assert (fast.box[:40, 2] == 1).all()  # the fallback was exercised
    pair = (recipe, EVERY_STEP)  # both views at once (one Philox call) as the reference draws them
    for fast, ref in zip(draw_two_views(pair, 7, 3, indices, widths, heights, SIZE),
                         draw_two_views(pair, 7, 3, indices, widths, heights, SIZE, reference=True)):
        assert _equal(fast, ref)


def test_draws_are_keyed_by_seed_epoch_index_and_view():
    recipes, idx = RECIPES["mocov2"], np.arange(64)
    w = h = np.full(64, 300)
    base = draw_two_views(recipes, 0, 0, idx, w, h, SIZE)
    # a sample's draws do not depend on which other samples share its batch, or their order
    part = draw_two_views(recipes, 0, 0, idx[::-1][:10], w[:10], h[:10], SIZE)
    assert _equal(part[0], base[0].take(np.arange(63, 53, -1)))
    for other in (draw_two_views(recipes, 1, 0, idx, w, h, SIZE), draw_two_views(recipes, 0, 1, idx, w, h, SIZE)):
        assert not np.array_equal(other[0].box, base[0].box)
    assert not np.array_equal(base[0].box, base[1].box)  # anchor and query differ
    assert _equal(ViewDraws.from_params(base[0].as_params()), base[0])


def _old(recipe: ViewRecipe, n: int, width: int, height: int) -> ViewDraws:
    params = [sample_view_params(view_rngs(11, 0, i)[0], recipe, width, height, SIZE) for i in range(n)]
    return ViewDraws.from_params(params)


def _ks_differs(a: np.ndarray, b: np.ndarray, alpha: float = 1e-6) -> bool:
    """Two-sample Kolmogorov-Smirnov: do `a` and `b` come from different distributions?"""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    gap = np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()
    return gap > math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


def _rate_differs(flags: np.ndarray, p: float) -> bool:
    """Binomial z-test of the rate of `flags` against `p` at five standard deviations."""
    if p in (0.0, 1.0):
        return bool(flags.mean() != p)
    return abs(flags.mean() - p) > 5 * math.sqrt(p * (1 - p) / len(flags))


@pytest.mark.parametrize("shape", [(500, 375), (1200, 150)])  # an ImageNet photo; a panorama (fallbacks)
def test_distributions_match_torchvisions_algorithm(shape):
    width, height = shape
    n_old, n_new = 3000, 20000
    old = _old(EVERY_STEP, n_old, width, height)
    new = draw_views(EVERY_STEP, 11, 0, 0, np.arange(n_new), np.full(n_new, width), np.full(n_new, height), SIZE)
    lo, hi = EVERY_STEP.crop_scale
    for d in (old, new):
        scale = d.box[:, 2] * d.box[:, 3] / (width * height)
        assert scale.max() <= hi * 1.05 and (scale.min() >= lo * 0.9 or (d.box[:, 2:] == [width, height]).any())
        assert (d.box[:, :2] >= 0).all() and (d.box[:, 0] + d.box[:, 2] <= width).all()
        assert (d.box[:, 1] + d.box[:, 3] <= height).all()

    def crop_stats(d: ViewDraws) -> dict[str, np.ndarray]:
        left, top, w, h = d.box.T
        slack_x, slack_y = np.maximum(width - w, 1), np.maximum(height - h, 1)
        return {"scale": w * h / (width * height), "log_ratio": np.log(w / h), "x": left / slack_x, "y": top / slack_y}

    for name, (a, b) in {k: (v, crop_stats(new)[k]) for k, v in crop_stats(old).items()}.items():
        assert not _ks_differs(a, b), name
    for flag in ("jitter", "grayscale", "solarize", "flip"):
        p = getattr(EVERY_STEP, f"{flag}_prob")
        assert not _rate_differs(getattr(new, flag), p), flag
        assert not _rate_differs(getattr(old, flag), p), flag
    assert not _rate_differs(new.blur_sigma > 0, EVERY_STEP.blur_prob)
    on_old, on_new = old.jitter, new.jitter
    for factor, strength in (("brightness", 0.4), ("contrast", 0.4), ("saturation", 0.2)):
        values = getattr(new, factor)
        assert (values[~on_new] == 1).all()
        assert values[on_new].min() >= 1 - strength and values[on_new].max() <= 1 + strength
        assert not _ks_differs(getattr(old, factor)[on_old], values[on_new]), factor
    assert np.abs(new.hue).max() <= EVERY_STEP.hue and (new.hue[~on_new] == 0).all()
    assert not _ks_differs(old.hue[on_old], new.hue[on_new])
    blurred = new.blur_sigma > 0
    s_lo, s_hi = (s * SIZE / 224 for s in EVERY_STEP.blur_sigma)
    assert new.blur_sigma[blurred].min() >= s_lo and new.blur_sigma[blurred].max() <= s_hi
    assert not _ks_differs(old.blur_sigma[old.blur_sigma > 0], new.blur_sigma[blurred])
    # the jitter order: each of the 24 permutations equally often (chi-square, 23 dof, far tail)
    codes = new.order[on_new] @ np.array([64, 16, 4, 1])
    counts = np.unique(codes, return_counts=True)[1]
    expected = on_new.sum() / 24
    assert len(counts) == 24 and ((counts - expected) ** 2 / expected).sum() < 70
    assert (new.order[~on_new] == np.arange(4)).all()


def test_views_and_neighbours_are_independent():
    """No correlation between a sample's two views, or between neighbouring indices."""
    n = 20000
    u = {view: draws.uniforms(3, 2, np.arange(n), view) for view in (0, 1)}
    bound = 5 / math.sqrt(n)
    for slot in (draws.SLOT_SCALE, draws.SLOT_FLIP, draws.SLOT_TOP):
        assert abs(np.corrcoef(u[0][:, slot], u[1][:, slot])[0, 1]) < bound
        assert abs(np.corrcoef(u[0][:-1, slot], u[0][1:, slot])[0, 1]) < bound
    assert abs(np.corrcoef(u[0][:, 0], u[0][:, 1])[0, 1]) < bound  # slots of one sample
    assert 0 <= u[0].min() and u[0].max() < 1 and abs(u[0].mean() - 0.5) < 0.01


def test_scale_option_reaches_the_draws():
    narrow = replace(EVERY_STEP, crop_scale=(0.9, 1.0))
    d = draw_views(narrow, 0, 0, 0, np.arange(2000), np.full(2000, 400), np.full(2000, 400), SIZE)
    assert (d.box[:, 2] * d.box[:, 3] / 400**2).min() > 0.85


def test_bench_draws_command(tmp_path, capsys, monkeypatch, tiny_data):
    import json

    from iecl.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))  # the image index's cache: not the user's

    out = tmp_path / "draws.json"
    args = ["bench", "draws", "--batch-size", "8", "--batches", "2", "--json", str(out)]
    assert main([*args, *(["--data", str(tiny_data)] if _has_dali() else [])]) == 0
    record = json.loads(out.read_text())
    assert record["draws_us_per_sample"] > 0 and record["draws_reference_us_per_sample"] > 0
    assert "us/sample" in capsys.readouterr().out
    if _has_dali():
        assert record["dali_source_us_per_sample"] > 0 and record["dali_feed_us_per_sample"] > 0


def _has_dali() -> bool:
    import importlib.util

    return importlib.util.find_spec("nvidia.dali") is not None
