"""Evaluation: the labelled loader (pipeline/eval_views.py), kNN and linear probe
on synthetic features, and `iecl knn` / `iecl lineval` end to end."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iecl.pipeline import DataError, open_images
from iecl.pipeline.decode import decode_rgb
from iecl.pipeline.eval_views import (
    EvalBatchSampler,
    EvalLoader,
    augmented_view,
    center_view,
    view_rng,
)
from iecl.pipeline.views import MEAN_255, STD_255
from iecl.train.cli import main
from iecl.train.eval.knn import knn_accuracy, knn_evaluate
from iecl.train.eval.lineval import cosine_lr, linear_eval, probe_accuracy, train_probe
from iecl.train.eval.splits import labelled_splits, subset

SIZE = 32


# ----------------------------------------------------------------- synthetic features


def _clusters(n_per_class: int, seed: int, classes: int = 10, dim: int = 32, noise: float = 1.5):
    """Gaussian clusters around fixed centres (the same centres for every seed): separable, not trivially."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    points = centres[labels] + noise * torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed))
    return points, labels


def _shuffled(labels: torch.Tensor) -> torch.Tensor:
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]


@pytest.fixture(scope="module")
def features():
    return _clusters(30, seed=1) + _clusters(20, seed=2)  # 300 train, 200 val, 10 classes


def test_knn_on_synthetic_features(features):
    train, train_labels, val, val_labels = features
    train, val = F.normalize(train, dim=1), F.normalize(val, dim=1)
    good = knn_accuracy(train, train_labels, val, val_labels, num_classes=10, k=20)
    assert good["top1"] > 0.85 and good["top5"] > 0.95  # measured 0.915 / 1.0
    chance = knn_accuracy(train, _shuffled(train_labels), val, val_labels, num_classes=10, k=20)
    assert chance["top1"] < 0.2 and chance["top5"] < 0.65  # chance: 0.1 / 0.5


def test_probe_on_synthetic_features(features):
    train, train_labels, val, val_labels = features
    probe, losses = train_probe(train, train_labels, 10, epochs=15, batch_size=64)  # paper's lr, momentum, decay
    assert len(losses) == 15 and losses[-1] < 0.2 * losses[0]  # measured 1.85 -> 0.11
    good = probe_accuracy(probe, val, val_labels)
    assert good["top1"] > 0.85 and good["top5"] > 0.95  # measured 0.94 / 0.995
    probe, losses = train_probe(train, _shuffled(train_labels), 10, epochs=15, batch_size=64)
    chance = probe_accuracy(probe, val, val_labels)
    assert chance["top1"] < 0.2 and chance["top5"] < 0.65
    assert losses[-1] > 1.0  # little to learn: measured 1.78 (log 10 = 2.3)


def test_probe_init_and_schedule():
    probe, _ = train_probe(torch.zeros(4, 8), torch.tensor([0, 1, 0, 1]), 2, epochs=0)
    assert probe.bias.abs().max() == 0 and 0.002 < probe.weight.std() < 0.03  # N(0, 0.01)
    assert cosine_lr(0.03, 0, 100) == pytest.approx(0.03)
    assert cosine_lr(0.03, 50, 100) == pytest.approx(0.015)
    assert cosine_lr(0.03, 100, 100) == pytest.approx(0.0)


def test_probe_accuracy_top5_only_with_five_classes():
    probe = nn.Linear(3, 4)
    assert set(probe_accuracy(probe, torch.randn(6, 3), torch.zeros(6, dtype=torch.long))) == {"top1"}


# ----------------------------------------------------------------- the loader


def _expected(images, indices, train_augment=False, seed=0, epoch=0) -> torch.Tensor:
    """The views the loader should produce for `indices`, made directly with PIL, uint8 NHWC."""
    views = []
    for i in indices:
        img = decode_rgb(images.read(int(i)))
        view = augmented_view(img, SIZE, view_rng(seed, epoch, int(i))) if train_augment else center_view(img, SIZE)
        views.append(torch.from_numpy(view.copy()))
    return torch.stack(views)


def _as_uint8(batch: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: NCHW float -> uint8 NHWC."""
    mean, std = torch.tensor(MEAN_255).view(1, 3, 1, 1), torch.tensor(STD_255).view(1, 3, 1, 1)
    return (batch * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _collect(loader):
    batches = list(loader)
    return torch.cat([b for b, _ in batches]), torch.cat([y for _, y in batches]), [len(y) for _, y in batches]


def test_center_crop_loader_covers_every_image_in_order(tiny_data):
    images = open_images(tiny_data)
    loader = EvalLoader(images, batch_size=20, image_size=SIZE, workers=0, device="cpu")
    assert len(loader) == 3
    batches = list(loader)
    assert [len(y) for _, y in batches] == [20, 20, 8]  # last batch partial, none dropped
    first, labels = batches[0]
    assert first.shape == (20, 3, SIZE, SIZE) and first.dtype == torch.float32 and first.device.type == "cpu"
    assert first.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64
    views = torch.cat([b for b, _ in batches])
    assert torch.cat([y for _, y in batches]).tolist() == [label for _, label in images.samples]
    assert views.mean().abs() < 1.0 and 0.3 < views.std() < 2.0  # normalised, roughly zero-centred
    # Every image exactly once, in the ImageList's order, with the centre-crop transform.
    torch.testing.assert_close(_as_uint8(views), _expected(images, range(len(images))), atol=1, rtol=0)
    assert loader.bad_files == []


def test_center_crop_geometry():
    from PIL import Image

    # A 70 x 35 image whose columns are numbered: resized to 74 x 37 (shorter side
    # round(32 * 256 / 224) = 37), the central 32 columns are kept.
    ramp = np.tile(np.arange(70, dtype=np.uint8)[None, :, None] * 3, (35, 1, 3))
    view = center_view(Image.fromarray(ramp), SIZE)
    assert view.shape == (SIZE, SIZE, 3)
    # Column j of the view is column j + 21 of the 74-wide resize, source x = (j + 21.5) * 70/74 - 0.5.
    source_x = (np.arange(SIZE) + 21 + 0.5) * 70 / 74 - 0.5
    np.testing.assert_allclose(view[SIZE // 2, :, 0], source_x * 3, atol=2)


def test_augmented_view_crops_and_flips():
    from PIL import Image

    # Red = column index: a flipped view decreases left to right, and the span
    # of columns a view covers measures its crop width.
    ramp = np.zeros((160, 200, 3), np.uint8)
    ramp[..., 0] = np.arange(200, dtype=np.uint8)[None, :]
    views = [augmented_view(Image.fromarray(ramp), SIZE, view_rng(0, 0, i)) for i in range(60)]
    rows = [v[SIZE // 2, :, 0].astype(int) for v in views]
    flipped = sum(row[0] > row[-1] for row in rows)
    assert 18 <= flipped <= 42  # p = 1/2
    spans = [abs(row[-1] - row[0]) for row in rows]
    assert min(spans) < 60 and max(spans) > 150  # scale 0.08-1: small and near-full crops both occur


def test_workers_give_the_same_batches(tiny_data):
    images = open_images(tiny_data)
    in_process = _collect(EvalLoader(images, batch_size=16, image_size=SIZE, workers=0, device="cpu"))
    loader = EvalLoader(images, batch_size=16, image_size=SIZE, workers=2, device="cpu", train_augment=False)
    try:
        with_workers = _collect(loader)
    finally:
        loader.close()
    assert torch.equal(in_process[0], with_workers[0]) and torch.equal(in_process[1], with_workers[1])


def test_train_augment_is_seeded_per_epoch(tiny_data):
    images = subset(open_images(tiny_data), range(0, 48, 3))  # 16 images, all classes
    labels = torch.tensor([label for _, label in images.samples])

    def epoch(seed: int, e: int):
        loader = EvalLoader(images, batch_size=6, image_size=SIZE, workers=0, device="cpu", train_augment=True, seed=seed)
        loader.set_epoch(e)
        views, got_labels, sizes = _collect(loader)
        return views, got_labels, sizes, loader.indices()

    views0, labels0, sizes, order0 = epoch(seed=7, e=0)
    assert sizes == [6, 6, 4]
    assert sorted(order0.tolist()) == list(range(16))  # every image once, shuffled
    assert order0.tolist() != list(range(16))
    assert torch.equal(labels0, labels[order0])
    torch.testing.assert_close(_as_uint8(views0), _expected(images, order0, True, seed=7, epoch=0), atol=1, rtol=0)
    again = epoch(seed=7, e=0)
    assert torch.equal(again[0], views0) and np.array_equal(again[3], order0)  # reruns agree
    views1, _, _, order1 = epoch(seed=7, e=1)
    assert order1.tolist() != order0.tolist()
    # The same image gets a different crop in another epoch (compare per image, not per position).
    by_image0 = views0[np.argsort(order0)]
    by_image1 = views1[np.argsort(order1)]
    differs = [(by_image0[i] - by_image1[i]).abs().mean() > 0.05 for i in range(16)]
    assert sum(differs) >= 14
    assert not torch.equal(epoch(seed=8, e=0)[0], views0)


def test_ranks_split_the_images_disjointly():
    shares = [EvalBatchSampler(10, 3, shuffle=True, seed=1, rank=r, world_size=3) for r in range(3)]
    indices = [s.indices(0) for s in shares]
    assert sorted(np.concatenate(indices).tolist()) == list(range(10))
    assert [len(s) for s in shares] == [2, 1, 1]  # 4, 3, 3 images in batches of 3


def _classes(root) -> list[str]:
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


@pytest.fixture
def damaged_data(tiny_data, tmp_path):
    """Six images of two classes; one truncated JPEG and one file that is not an image."""
    root = tmp_path / "damaged"
    for cls in _classes(tiny_data)[:2]:
        (root / cls).mkdir(parents=True)
        for name in sorted(os.listdir(tiny_data / cls))[:3]:
            shutil.copy(tiny_data / cls / name, root / cls / name)
    first, second = _classes(root)
    truncated = sorted((root / first).iterdir())[1]  # image 1 of 6
    truncated.write_bytes(truncated.read_bytes()[:2000])
    not_image = max((root / second).iterdir())  # image 5 of 6
    not_image.write_bytes(b"this is not a JPEG")
    return root, str(truncated), str(not_image)


def test_unreadable_images_are_skipped_and_named(damaged_data):
    root, truncated, not_image = damaged_data
    images = open_images(root)
    loader = EvalLoader(images, batch_size=4, image_size=SIZE, workers=0, device="cpu")
    views, labels, sizes = _collect(loader)
    readable = [i for i in range(6) if images.samples[i][0] not in (truncated, not_image)]
    assert sizes == [3, 1]  # batch 1 lost the truncated image, batch 2 the non-image
    assert labels.tolist() == [images.samples[i][1] for i in readable]
    torch.testing.assert_close(_as_uint8(views), _expected(images, readable), atol=1, rtol=0)
    assert len(loader.bad_files) == 2
    # Named as every training backend names them: relative to the data root.
    assert loader.bad_files[0].startswith(os.path.relpath(truncated, root) + " (")
    assert loader.bad_files[1].startswith(os.path.relpath(not_image, root) + " (")
    list(loader)  # a second epoch does not name them twice
    assert len(loader.bad_files) == 2


def test_no_readable_image_is_a_data_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"nope")
    loader = EvalLoader(open_images(tmp_path), batch_size=4, image_size=SIZE, workers=0, device="cpu")
    with pytest.raises(DataError, match="none of the images"):
        list(loader)


# ----------------------------------------------------------------- kNN and the probe on images


def _mean_colour() -> nn.Module:
    """A 'backbone' whose features are an image's mean colour: the synthetic classes differ in colour."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_knn_evaluate_on_images(tiny_data):
    splits = labelled_splits(tiny_data, 0.25, seed=0)
    backbone = _mean_colour().train()
    kwargs = {"num_classes": 4, "image_size": SIZE, "batch_size": 16, "workers": 0, "device": "cpu", "k": 5}
    result = knn_evaluate(backbone, splits.train, splits.val, **kwargs)
    assert backbone.training  # mode restored
    assert result["train_images"] == 36 and result["val_images"] == 12 and result["bad_files"] == []
    assert result["top1"] >= 0.75  # chance 0.25
    assert "top5" not in result  # 4 classes
    part = knn_evaluate(backbone, splits.train, splits.val, max_train_images=20, seed=1, **kwargs)
    assert part["train_images"] == 20 and part["train_images_total"] == 36
    assert knn_evaluate(backbone, splits.train, splits.val, max_train_images=20, seed=1, **kwargs)["top1"] == part["top1"]


def test_linear_eval_on_images_keeps_backbone_mode(tiny_data):
    splits = labelled_splits(tiny_data, 0.25, seed=0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.train()
    stats = backbone[1].running_mean.clone()
    result = linear_eval(backbone, splits.train, splits.val, num_classes=4, image_size=SIZE, workers=0,
                         device="cpu", epochs=3, batch_size=16)
    assert backbone.training and torch.equal(backbone[1].running_mean, stats)  # frozen: eval mode inside
    assert all(p.grad is None for p in backbone.parameters())
    assert result["mode"] == "augmented" and len(result["train_loss"]) == 3
    assert result["train_images"] == 36 and result["val_images"] == 12
    assert 0 <= result["top1"] <= 1 and result["settings"]["lr"] == 0.03 and not result["settings"]["lr_scaled"]


# ----------------------------------------------------------------- the commands


def _run(argv: list[str]) -> int:
    return main([*argv, "--no-progress", "--workers", "0", "--image-size", str(SIZE)])


def test_knn_command(tiny_data, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "knn.json"
    assert _run(["knn", str(tiny_checkpoint), "--data", str(tiny_data), "--val-fraction", "0.25",
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert 0 <= record["top1"] <= 1 and record["top5"] is None
    assert record["train_images"] == 36 and record["val_images"] == 12 and record["k"] == 200
    assert record["checkpoint"]["step"] == 4 and record["checkpoint"]["method"] == "iecl"
    assert record["data"]["val_held_out"] and record["data"]["num_classes"] == 4
    text = capsys.readouterr().out
    assert "iecl resnet18" in text and "step 4" in text and "36 train / 12 val" in text and "top-1" in text


def test_lineval_command_augmented(tiny_data, tiny_checkpoint, tmp_path):
    out = tmp_path / "lineval.json"
    assert _run(["lineval", str(tiny_checkpoint / "last.pt"), "--data", str(tiny_data), "--val-fraction", "0.25",
                 "--epochs", "2", "--batch-size", "16", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert 0 <= record["top1"] <= 1 and record["mode"] == "augmented" and record["epochs"] == 2
    assert len(record["train_loss"]) == 2 and all(np.isfinite(record["train_loss"]))
    assert record["train_images"] == 36 and record["val_images"] == 12


def test_lineval_feature_cache_is_reused(tiny_data, tiny_checkpoint, tmp_path, monkeypatch):
    from iecl.train.eval import lineval

    calls = []
    real = lineval.image_features
    monkeypatch.setattr(lineval, "image_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache, out = tmp_path / "feats.pt", tmp_path / "cached.json"
    argv = ["lineval", str(tiny_checkpoint), "--data", str(tiny_data), "--val-fraction", "0.25",
            "--epochs", "2", "--cached", "--feature-cache", str(cache), "--json", str(out)]
    assert _run(argv) == 0
    assert len(calls) == 2 and cache.is_file()  # train and val extracted once
    first, mtime = json.loads(out.read_text()), cache.stat().st_mtime_ns
    assert first["mode"] == "cached" and not first["cache_hit"] and first["train_images"] == 36
    assert _run(argv) == 0
    second = json.loads(out.read_text())
    assert len(calls) == 2 and cache.stat().st_mtime_ns == mtime and second["cache_hit"]  # loaded, not extracted
    assert second["top1"] == first["top1"] and second["train_loss"] == first["train_loss"]
    # Another image size is another key: extracted again and the file replaced.
    assert main([*argv, "--no-progress", "--workers", "0", "--image-size", "40"]) == 0
    assert len(calls) == 4 and not json.loads(out.read_text())["cache_hit"]


def test_commands_report_user_errors(tiny_data, tiny_checkpoint, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next((tiny_data / _classes(tiny_data)[0]).iterdir()), flat / "a.jpg")
    not_cache = tmp_path / "precious.txt"
    not_cache.write_text("keep me")
    cases = {
        "missing data": ["knn", str(tiny_checkpoint), "--data", str(tmp_path / "nowhere")],
        "unlabelled data": ["knn", str(tiny_checkpoint), "--data", str(flat)],
        "no checkpoint": ["knn", str(tmp_path), "--data", str(tiny_data)],
        "not a checkpoint": ["lineval", str(not_cache), "--data", str(tiny_data)],
        "cache without --cached": ["lineval", str(tiny_checkpoint), "--data", str(tiny_data), "--feature-cache", "x.pt"],
        "foreign cache file": ["lineval", str(tiny_checkpoint), "--data", str(tiny_data), "--val-fraction", "0.25",
                               "--epochs", "1", "--cached", "--feature-cache", str(not_cache)],
        "bad fraction": ["knn", str(tiny_checkpoint), "--data", str(tiny_data), "--val-fraction", "1.5"],
    }
    for case, argv in cases.items():
        assert _run(argv) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[0].startswith(f"iecl {argv[0]}: error: "), (case, err)
    assert not_cache.read_text() == "keep me"


def test_train_and_val_folders(tiny_data, tiny_checkpoint, tmp_path):
    root = tmp_path / "split"
    for cls in _classes(tiny_data):
        names = sorted(os.listdir(tiny_data / cls))
        for split, chosen in (("train", names[:8]), ("val", names[8:])):
            (root / split / cls).mkdir(parents=True)
            for name in chosen:
                os.symlink(tiny_data / cls / name, root / split / cls / name)
    out = tmp_path / "knn.json"
    assert _run(["knn", str(tiny_checkpoint), "--data", str(root), "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert not record["data"]["val_held_out"] and record["train_images"] == 32 and record["val_images"] == 16


@pytest.mark.parametrize("command", ["knn", "lineval"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"iecl {command} runs/" in text and "--data DIR" in text
