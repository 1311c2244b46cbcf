"""FFCV backend (pipeline/ffcv.py): conversion round trips and the two-view loader.

FFCV JIT-compiles each loader's decoders on its first epoch (seconds), so the
tests share two module-scoped loaders (rank 0 of 1, rank 1 of 2).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

if importlib.util.find_spec("ffcv") is None:  # importing ffcv itself would set torch to one thread
    pytest.skip("ffcv is not installed", allow_module_level=True)

from iecl.pipeline import BatchPlan, DataError, scan_image_folder
from iecl.pipeline.augment import get_recipe
from iecl.pipeline.ffcv import FfcvLoader, beton_info, convert, read_labels
from iecl.pipeline.reference import ReferenceLoader
from iecl.pipeline.sampler import EpochBatchSampler
from iecl.pipeline.synthetic import SyntheticSpec, make_synthetic

# numba's dispatcher finalizers raise a harmless KeyError when an FFCV loader's
# compiled functions are freed (as they do for FFCV's own decoders).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

BATCH, SIZE, SEED = 8, 32, 7
RECIPES = get_recipe("mocov2")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffcv") / "labeled"
    make_synthetic(root, SyntheticSpec(40, 4, seed=11), workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def beton(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("beton") / "data.beton"
    info = convert(scan_image_folder(data), out, max_resolution=256, workers=1, progress=False)
    return out, info


def _plan(workers: int, **changes) -> BatchPlan:
    return replace(BatchPlan(RECIPES, BATCH, SIZE, SEED, workers, torch.device("cpu")), **changes)


def _loader(beton_path, **changes) -> FfcvLoader:
    return FfcvLoader(str(beton_path), _plan(1, **changes))


def _reference(data, **changes) -> ReferenceLoader:
    return ReferenceLoader(scan_image_folder(data), _plan(0, **changes))


@pytest.fixture(scope="module")
def loader(beton):
    ld = _loader(beton[0])
    yield ld
    ld.close()


def _epoch(ld, epoch: int, start: int = 0) -> list:
    ld.set_epoch(epoch, start)
    return [tuple(t.clone() for t in batch) for batch in ld]


# --- conversion -------------------------------------------------------------------------------


def test_convert_keeps_every_label_in_order(data, beton):
    path, info = beton
    images = scan_image_folder(data)
    assert info["written"] == len(images) and info["skipped"] == []
    assert info["path"] == str(path) and info["bytes"] == path.stat().st_size > 0 and info["seconds"] > 0
    np.testing.assert_array_equal(read_labels(path), [label for _, label in images.samples])
    meta = beton_info(path)
    assert meta["samples"] == len(images) and meta["labeled"] and meta["classes"] == 4
    assert {"image", "label"} <= set(meta["fields"]) and meta["max_side"] <= 256
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporary file left


def test_flat_folder_gets_label_minus_one(data, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for src in sorted(data.glob("*/*.JPEG"))[:5]:
        shutil.copy(src, flat / src.name)
    out = tmp_path / "flat.beton"
    info = convert(scan_image_folder(flat), out, workers=1, progress=False)
    assert info["written"] == 5
    np.testing.assert_array_equal(read_labels(out), [-1] * 5)
    assert not beton_info(out)["labeled"]


def test_unreadable_images_are_skipped_and_reported(data, tmp_path):
    root = tmp_path / "broken"
    for src in sorted(data.glob("*/*.JPEG"))[:6]:
        (root / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / src.parent.name / src.name)
    first = min(root.glob("*/*.JPEG"))
    truncated = first.with_name("truncated.jpg")
    truncated.write_bytes(first.read_bytes()[:3000])
    text = first.with_name("notes.jpg")
    text.write_text("not an image\n")
    loop = first.with_name("loop.jpg")
    loop.symlink_to(loop.name)  # a symlink loop: a bad entry of the folder, reported, no traceback
    images = scan_image_folder(root)
    out = tmp_path / "broken.beton"
    info = convert(images, out, workers=2, progress=False)
    assert sorted(name for name, _ in info["skipped"]) == sorted([str(text), str(truncated), str(loop)])
    assert all(reason for _, reason in info["skipped"])
    assert info["written"] == len(images) - 2 == beton_info(out)["samples"]
    kept = [label for path, label in images.samples if path not in (str(text), str(truncated))]
    np.testing.assert_array_equal(read_labels(out), kept)


def test_refuses_to_overwrite(data, beton, tmp_path):
    path, _ = beton
    before = path.stat().st_mtime_ns
    with pytest.raises(DataError, match="already exists"):
        convert(scan_image_folder(data), path, workers=1, progress=False)
    assert path.stat().st_mtime_ns == before
    small = tmp_path / "small"
    small.mkdir()
    for src in sorted(data.glob("*/*.JPEG"))[:3]:
        shutil.copy(src, small / src.name)
    out = tmp_path / "small.beton"
    out.write_bytes(b"old")
    info = convert(scan_image_folder(small), out, workers=1, progress=False, overwrite=True)
    assert info["written"] == 3 and beton_info(out)["samples"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small", "small.beton"]


def test_missing_or_bad_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        beton_info(tmp_path / "none.beton")
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"\0" * 100)
    with pytest.raises(DataError):
        beton_info(junk)


def test_without_ffcv_a_clear_error(monkeypatch, beton):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # import ffcv -> ImportError
    with pytest.raises(DataError, match="pip install ffcv"):
        _loader(beton[0])


# --- loading ----------------------------------------------------------------------------------


def test_batches_have_the_view_contract(loader, beton):
    assert len(loader) == EpochBatchSampler(beton_info(beton[0])["samples"], BATCH, SEED).batches == 5
    assert loader.bad_files == []
    batches = _epoch(loader, 0)
    assert len(batches) == len(loader)
    for anchor, query, label in batches:
        for view in (anchor, query):
            assert view.shape == (BATCH, SIZE, SIZE, 3) and view.dtype == torch.uint8
            assert view.is_contiguous() and view.device.type == "cpu"
            assert 20 < view.float().mean() < 235 and view.float().std() > 5  # real pixels, not a blank buffer
        assert label.dtype == torch.int64 and label.shape == (BATCH,) and 0 <= label.min() and label.max() < 4
        assert not torch.equal(anchor, query)  # two views of each image


def test_same_seed_same_batches_and_epochs_differ(loader):
    first, again, other = _epoch(loader, 0), _epoch(loader, 0), _epoch(loader, 1)
    for a, b in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(first[0][0], other[0][0])
    assert len(other) == len(first)  # drop_last: every epoch is as long


def test_same_order_and_views_as_the_reference(loader, data):
    reference = _reference(data)
    for epoch in (0, 1):
        reference.set_epoch(epoch)
        ours = _epoch(loader, epoch)
        theirs = list(reference)
        assert len(ours) == len(theirs)
        for (anchor, query, label), (ref_anchor, ref_query, ref_label) in zip(ours, theirs):
            assert torch.equal(label, ref_label)
            # Same crop boxes and jitter parameters: only JPEG re-encoding and the
            # resize filter (OpenCV INTER_AREA vs PIL bilinear) differ.
            for view, ref in ((anchor, ref_anchor), (query, ref_query)):
                assert (view.float() - ref.float()).abs().mean() < 6


def test_channel_statistics_agree_with_the_reference(loader, data):
    reference = _reference(data)
    reference.set_epoch(2)
    ours = torch.cat([torch.cat([a, q]) for a, q, _ in _epoch(loader, 2)]).float()
    theirs = torch.cat([torch.cat([a, q]) for a, q, _ in reference]).float()
    for stat in (lambda x: x.mean((0, 1, 2)), lambda x: x.std((0, 1, 2))):
        assert (stat(ours) - stat(theirs)).abs().max() < 10


def test_set_epoch_start_batch_gives_the_tail(loader):
    full = _epoch(loader, 3)
    tail = _epoch(loader, 3, start=3)
    assert len(tail) == len(full) - 3
    for a, b in zip(full[3:], tail):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert _epoch(loader, 3, start=len(full)) == []


def test_leaving_an_epoch_early_then_continuing(loader):
    loader.set_epoch(4)
    for k, _ in enumerate(loader):
        if k == 1:
            break
    assert len(_epoch(loader, 4)) == len(loader)


def test_ranks_are_disjoint_and_match_the_reference(beton, data):
    n = beton_info(beton[0])["samples"]
    samplers = [EpochBatchSampler(n, BATCH, SEED, rank, 2) for rank in range(2)]
    assert not set(samplers[0].indices(0)) & set(samplers[1].indices(0))
    second = _loader(beton[0], rank=1, world_size=2)
    reference = _reference(data, rank=1, world_size=2)
    try:
        assert len(second) == samplers[1].batches == 2
        for (anchor, _, label), (ref_anchor, _, ref_label) in zip(_epoch(second, 0), list(reference)):
            assert torch.equal(label, ref_label)
            assert (anchor.float() - ref_anchor.float()).abs().mean() < 6
    finally:
        second.close()
