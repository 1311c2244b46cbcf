"""Data (pipeline/): synthetic folders, discovery, sampling, augmentation, the reference loader."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iecl.pipeline import (
    BatchPlan,
    DataError,
    LoaderSpec,
    build_loader,
    scan_image_folder,
)
from iecl.pipeline.augment import RECIPES, get_recipe, sample_crop
from iecl.pipeline.folder import UNLABELED
from iecl.pipeline.sampler import EpochBatchSampler
from iecl.pipeline.synthetic import (
    MANIFEST,
    SyntheticSpec,
    make_synthetic,
    render_image,
)

CPU = torch.device("cpu")


def _digest(root) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".JPEG"):
                path = os.path.join(dirpath, name)
                out[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def test_synthetic_is_deterministic_and_reused(tmp_path):
    spec = SyntheticSpec(12, 3, seed=7)
    first = make_synthetic(tmp_path / "a", spec, workers=2, progress=False)
    make_synthetic(tmp_path / "b", spec, workers=1, progress=False)
    assert not first["reused"] and _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert len(_digest(tmp_path / "a")) == 12
    assert make_synthetic(tmp_path / "a", spec, progress=False)["reused"]
    assert (tmp_path / "a" / MANIFEST).exists()
    assert not list(tmp_path.glob("*.partial-*"))
    other = make_synthetic(tmp_path / "c", SyntheticSpec(12, 3, seed=8), workers=1, progress=False)
    assert other["root"] and _digest(tmp_path / "c") != _digest(tmp_path / "a")


def test_synthetic_refuses_to_overwrite_other_content(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="--overwrite"):
        make_synthetic(tmp_path / "mine", SyntheticSpec(4, 2), progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_synthetic_images_look_like_imagenet(tmp_path):
    """ImageNet-like sizes, ~100 KB JPEGs, and structure rather than noise."""
    spec = SyntheticSpec(40, 4, seed=1)
    info = make_synthetic(tmp_path / "s", spec, workers=2, progress=False)
    assert 60_000 < info["bytes"] / spec.images < 160_000
    sizes = []
    for rel in list(_digest(tmp_path / "s"))[:10]:
        with Image.open(tmp_path / "s" / rel) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            sizes.append(img.size)
            pixels = np.asarray(img, np.float32).mean(axis=2)
        # Neighbouring pixels of natural images are strongly correlated; white noise's are not.
        a, b = pixels[:, :-1].ravel(), pixels[:, 1:].ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.6
        # Smooth structure: a 16x downscale keeps a good share of the variance.
        small = np.asarray(Image.fromarray(pixels).resize((pixels.shape[1] // 16, pixels.shape[0] // 16), Image.BOX))
        assert small.std() > 0.3 * pixels.std()
    assert all(200 <= max(w, h) <= 1000 and 0.5 <= w / h <= 2.0 for w, h in sizes)


def test_render_depends_only_on_seed_and_index():
    spec = SyntheticSpec(10, 2, seed=4)
    assert np.array_equal(np.asarray(render_image(spec, 3)), np.asarray(render_image(spec, 3)))
    assert not np.array_equal(np.asarray(render_image(spec, 3)), np.asarray(render_image(spec, 4)))


def test_scan_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        scan_image_folder(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        scan_image_folder(tmp_path / "file.txt")


def test_scan_layouts(tmp_path, tiny_data):
    labelled = scan_image_folder(tiny_data)
    assert len(labelled) == 48 and labelled.classes == [f"class_{i:04d}" for i in range(4)]
    assert sorted({label for _, label in labelled.samples}) == [0, 1, 2, 3]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (i * 50, 0, 0)).save(flat / f"img{i}.jpg")
    (flat / "readme.md").write_text("not an image")
    unlabeled = scan_image_folder(flat)
    assert len(unlabeled) == 3 and {label for _, label in unlabeled.samples} == {UNLABELED}


def test_sampler_shards_are_disjoint_equal_and_reshuffled():
    n, batch, world = 103, 4, 3
    samplers = [EpochBatchSampler(n, batch, seed=1, rank=r, world_size=world) for r in range(world)]
    assert {len(s) for s in samplers} == {n // (batch * world)}
    for epoch in (0, 1):
        parts = [set(s.indices(epoch).tolist()) for s in samplers]
        assert sum(len(p) for p in parts) == len(set().union(*parts)) == len(samplers[0]) * batch * world
    assert not np.array_equal(samplers[0].indices(0), samplers[0].indices(1))


def test_sampler_resume_skips_done_batches():
    sampler = EpochBatchSampler(40, 8, seed=2)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start_batch=2)
    assert list(sampler) == full[2:]
    with pytest.raises(DataError, match="fewer than one batch"):
        EpochBatchSampler(5, 8, seed=0)


def test_random_resized_crop_stays_inside():
    rng = np.random.default_rng(0)
    for _ in range(500):
        w, h = int(rng.integers(20, 800)), int(rng.integers(20, 800))
        left, top, cw, ch = sample_crop(rng, w, h, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left and 0 <= top and left + cw <= w and top + ch <= h and cw > 0 and ch > 0


def test_recipes():
    assert set(RECIPES) == {"mocov2", "simclr", "byol"}
    anchor, query = get_recipe("byol")
    assert anchor.blur_prob == 1.0 and query.solarize_prob == 0.2
    assert get_recipe("mocov2", (0.5, 1.0))[1].crop_scale == (0.5, 1.0)


def _loader(root, workers=0, seed=0, batch=8, size=32):
    return build_loader(scan_image_folder(root), LoaderSpec("pil", BatchPlan(get_recipe("mocov2"), batch, size, seed, workers, CPU)))


def test_loader_batches(tiny_data):
    loader = _loader(tiny_data)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    b = batches[0]
    assert b.anchor.shape == b.query.shape == (8, 32, 32, 3)
    assert b.anchor.dtype == b.query.dtype == torch.uint8 and b.label.dtype == torch.int64
    assert not torch.equal(b.anchor, b.query)  # two independent augmentations
    assert b.anchor.float().std() > 10  # real image content, not a blank buffer
    labels = torch.cat([x.label for x in batches])
    assert sorted(labels.tolist()) == sorted(label for _, label in scan_image_folder(tiny_data).samples)


def test_loader_is_deterministic_across_workers_and_seeds(tiny_data):
    def epoch(loader, e):
        loader.set_epoch(e)
        return [(x.anchor, x.query, x.label) for x in loader]

    inline, workers = epoch(_loader(tiny_data), 1), epoch(_loader(tiny_data, workers=2), 1)
    for (a1, q1, l1), (a2, q2, l2) in zip(inline, workers):
        assert torch.equal(a1, a2) and torch.equal(q1, q2) and torch.equal(l1, l2)
    other_seed = epoch(_loader(tiny_data, seed=1), 1)
    assert not torch.equal(inline[0][0], other_seed[0][0])
    assert not torch.equal(epoch(_loader(tiny_data), 2)[0][0], inline[0][0])


def test_unreadable_image_is_named(tmp_path, tiny_data):
    root = tmp_path / "broken"
    (root / "a").mkdir(parents=True)
    for i, src in enumerate(sorted((tiny_data / "class_0000").iterdir())[:8]):
        (root / "a" / f"ok{i}.JPEG").write_bytes(src.read_bytes())
    data = (root / "a" / "ok3.JPEG").read_bytes()
    (root / "a" / "ok3.JPEG").write_bytes(data[: len(data) // 3])  # truncated
    (root / "a" / "zz.JPEG").write_bytes(b"not a jpeg at all")
    loader = _loader(root, batch=9, workers=2)
    loader.set_epoch(0)
    (batch,) = list(loader)  # worker processes: the names come back from them
    assert batch.anchor.shape[0] == 9
    assert sorted(name.split(" (")[0].rsplit("/", 1)[1] for name in loader.bad_files) == ["ok3.JPEG", "zz.JPEG"]
    assert any("truncated" in name for name in loader.bad_files)
    # All unreadable: a clear error, not an endless search for a replacement.
    for path in (root / "a").iterdir():
        path.write_bytes(b"junk")
    loader = _loader(root, batch=9)
    with pytest.raises(DataError, match="none of the 9 images"):
        list(loader)
