"""Dataset sources (folders, file lists, tar shards), validation, bad-image
replacement in the reference loader, and rank sharding across epochs."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from iecl.pipeline import BatchPlan, DataError, LoaderSpec, build_loader, open_images
from iecl.pipeline.augment import get_recipe
from iecl.pipeline.decode import decode_rgb
from iecl.pipeline.folder import UNLABELED
from iecl.pipeline.sampler import EpochBatchSampler
from iecl.pipeline.sources import expand_braces
from iecl.pipeline.validate import validate_images
from iecl.train.cli import main

CPU = torch.device("cpu")


def _write_shards(tmp_path, images, per_shard: int, with_labels: bool = True) -> list:
    """webdataset-style shards of `images` (an ImageList): key.jpg (+ key.cls)."""
    shards = []
    for s, lo in enumerate(range(0, len(images), per_shard)):
        path = tmp_path / f"train-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(lo, min(lo + per_shard, len(images))):
                members = [(f"sample{i:05d}.jpg", images.read(i))]
                if with_labels:
                    members.append((f"sample{i:05d}.cls", str(images.samples[i][1]).encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def test_tar_shards_read_like_the_folder(tmp_path, tiny_data):
    folder = open_images(tiny_data)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    _write_shards(shard_dir, folder, per_shard=20)
    for spec in (shard_dir, str(shard_dir / "train-{000..002}.tar")):
        shards = open_images(spec)
        assert len(shards) == len(folder) == 48
        assert [label for _, label in shards.samples] == [label for _, label in folder.samples]
        assert all(shards.read(i) == folder.read(i) for i in (0, 19, 20, 47))
        assert shards.name(20) == f"{shard_dir / 'train-001.tar'}:sample00020.jpg"
    one = open_images(shard_dir / "train-002.tar")
    assert len(one) == 8


def test_unlabeled_tar_shards_and_loader(tmp_path, tiny_data):
    folder = open_images(tiny_data)
    _write_shards(tmp_path, folder, per_shard=48, with_labels=False)
    shards = open_images(tmp_path / "train-000.tar")
    assert {label for _, label in shards.samples} == {UNLABELED}
    loader = build_loader(shards, LoaderSpec("pil", BatchPlan(get_recipe("mocov2"), 8, 32, 0, 0, CPU)))
    batch = next(iter(loader))
    assert batch.anchor.shape == (8, 32, 32, 3) and (batch.label == UNLABELED).all()


def test_tar_shard_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_images(tmp_path / "x-{0..1}.tar")
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DataError, match="empty.tar"):
        open_images(tmp_path / "empty.tar")
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]


def test_file_list(tmp_path, tiny_data):
    folder = open_images(tiny_data)
    rel = [p.replace(str(tiny_data), "tiny") for p, _ in folder.samples[:6]]
    shutil.copytree(tiny_data, tmp_path / "tiny")
    (tmp_path / "named.txt").write_text("# path, class\n" + "".join(f"{p}, {p.split('/')[1]}\n" for p in rel))
    named = open_images(tmp_path / "named.txt")
    assert len(named) == 6 and named.classes == sorted({p.split("/")[1] for p in rel})
    assert named.read(0) == folder.read(0)
    (tmp_path / "numbered.lst").write_text("\n".join(f"{p} {k}" for k, p in enumerate(rel)) + "\n\n")
    assert [label for _, label in open_images(tmp_path / "numbered.lst").samples] == list(range(6))
    (tmp_path / "plain.txt").write_text("\n".join(rel))
    assert {label for _, label in open_images(tmp_path / "plain.txt").samples} == {UNLABELED}
    (tmp_path / "missing.txt").write_text("tiny/nope.JPEG\n")
    with pytest.raises(DataError, match="1 missing file"):
        open_images(tmp_path / "missing.txt")
    (tmp_path / "mixed.txt").write_text(f"{rel[0]} 1\n{rel[1]}\n")
    with pytest.raises(DataError, match="some images and not others"):
        open_images(tmp_path / "mixed.txt")
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(DataError, match="neither a file list"):
        open_images(tmp_path / "notes.md")


@pytest.fixture
def damaged(tmp_path, tiny_data):
    """The tiny set plus a truncated JPEG, a non-image named .JPEG and a README."""
    root = tmp_path / "damaged"
    shutil.copytree(tiny_data, root)
    good = (root / "class_0001").iterdir().__next__().read_bytes()
    (root / "class_0001" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / "class_0002" / "text.JPEG").write_bytes(b"this is not an image")
    (root / "README.txt").write_text("notes")
    return root


def test_validate_lists_unreadable_and_non_image_files(damaged):
    report = validate_images(open_images(damaged), workers=2, progress=False)
    assert report.checked == 50 and not report.ok
    assert sorted(name.rsplit("/", 1)[1] for name, _ in report.unreadable) == ["text.JPEG", "truncated.JPEG"]
    assert any("truncated" in reason for _, reason in report.unreadable)
    assert report.non_images == [str(damaged / "README.txt")]
    assert validate_images(open_images(damaged), workers=1, progress=False).unreadable == report.unreadable


def test_validate_command(capsys, tmp_path, damaged, tiny_data):
    out = tmp_path / "report.json"
    assert main(["validate", str(damaged), "--workers", "1", "--no-progress", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "unreadable" in text and "truncated.JPEG" in text and "text.JPEG" in text
    assert "50 images checked, 48 readable, 2 unreadable, 1 non-image files" in text
    assert json.loads(out.read_text())["readable"] == 48
    assert main(["validate", str(tiny_data), "--workers", "1", "--no-progress"]) == 0
    assert main(["validate", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_reference_loader_replaces_and_counts_bad_images(damaged):
    images = open_images(damaged)
    loader = build_loader(images, LoaderSpec("pil", BatchPlan(get_recipe("mocov2"), 10, 32, 0, 0, CPU)))
    batches = list(loader)
    assert len(batches) == len(loader) == 5  # full batches, nothing dropped for the bad files
    assert sorted(name.split(" (")[0].rsplit("/", 1)[1] for name in loader.bad_files) == ["text.JPEG", "truncated.JPEG"]
    # Replaced by the next readable image, deterministically.
    again = list(build_loader(images, LoaderSpec("pil", BatchPlan(get_recipe("mocov2"), 10, 32, 0, 0, CPU))))
    assert all(torch.equal(a.anchor, b.anchor) for a, b in zip(batches, again))


def test_decode_rgb_converts_modes():
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(buf, format="PNG")
    assert decode_rgb(buf.getvalue()).mode == "RGB"


def test_sharding_disjoint_complete_equal_and_reshuffled():
    """Ranks see disjoint, equally long parts; together every kept sample once;
    the split changes with the epoch; every epoch has the same number of batches."""
    n, batch, world = 103, 4, 3
    samplers = [EpochBatchSampler(n, batch, seed=7, rank=r, world_size=world) for r in range(world)]
    assert {len(s) for s in samplers} == {n // (batch * world)}
    parts_by_epoch = []
    for epoch in range(4):
        parts = []
        for s in samplers:
            s.set_epoch(epoch)
            parts.append([i for b in s for _, i in b])
        assert len({len(p) for p in parts}) == 1
        union = [i for p in parts for i in p]
        assert len(union) == len(set(union)) == (n // (batch * world)) * batch * world
        parts_by_epoch.append(parts)
    assert parts_by_epoch[0][0] != parts_by_epoch[1][0]
    # The dropped tail differs between epochs, so no image is never seen.
    seen = {i for parts in parts_by_epoch for p in parts for i in p}
    assert len(seen) > (n // (batch * world)) * batch * world


def test_every_epoch_yields_every_batch(tiny_data):
    """Peers have shipped loaders whose dropped last batch silently skipped
    epochs: iterating E epochs must give exactly E * len(loader) batches."""
    loader = build_loader(open_images(tiny_data), LoaderSpec("pil", BatchPlan(get_recipe("mocov2"), 7, 32, 1, 0, CPU)))
    counts = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        counts.append(sum(1 for _ in loader))
    assert counts == [len(loader)] * 3 == [48 // 7] * 3
