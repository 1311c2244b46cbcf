"""The fast backends inside the real training loop and the command line:
exact resume, `iecl convert`, and `iecl bench loader` for dali and ffcv."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from conftest import tiny_config

from iecl.cli import main
from iecl.pipeline import open_images
from iecl.pipeline.sources import open_beton
from iecl.train import checkpoint as ckpt
from iecl.train.loop import pretrain
from iecl.train.metrics import read_metrics

pytest.importorskip("nvidia.dali")
if importlib.util.find_spec("ffcv") is None:  # importing ffcv itself would set torch to one thread
    pytest.skip("ffcv is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny_beton(tmp_path_factory, tiny_data):
    from iecl.pipeline.ffcv import convert

    path = tmp_path_factory.mktemp("beton") / "tiny.beton"
    convert(open_images(tiny_data), path, max_resolution=256, workers=1, progress=False)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_backend_trains_and_resumes_exactly(backend, tmp_path, monkeypatch, tiny_data, tiny_beton):
    """A run interrupted mid-epoch and resumed logs the same losses as one that
    was not: the backend honours set_epoch(epoch, start_batch) and its
    augmentations depend only on (seed, epoch, index)."""
    root = tiny_beton if backend == "ffcv" else tiny_data
    cfg = tiny_config(root, tmp_path, {"data": {"backend": backend}, "train": {"epochs": 2, "checkpoint_every": 4}})
    images = open_beton(root) if backend == "ffcv" else open_images(root)
    kept = {}
    real_save = ckpt.save_atomic

    def save_and_keep(state, path):
        real_save(state, path)
        kept.setdefault(state["step"], path.read_bytes())

    monkeypatch.setattr(ckpt, "save_atomic", save_and_keep)
    (tmp_path / "full").mkdir()
    pretrain(cfg, tmp_path / "full", images, progress=False)
    monkeypatch.undo()
    (tmp_path / "at4.pt").write_bytes(kept[4])
    (tmp_path / "resumed").mkdir()
    pretrain(cfg, tmp_path / "resumed", images, state=ckpt.load(tmp_path / "at4.pt"), progress=False)
    expected = {r["step"]: r for r in read_metrics(tmp_path / "full")}
    rows = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in rows] == list(range(5, 13))
    for row in rows:
        assert row["loss"] == expected[row["step"]]["loss"], row["step"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_convert_command(capsys, tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "class_0001" / "zz_cut.JPEG").write_bytes((data / "class_0001").iterdir().__next__().read_bytes()[:3000])
    out = tmp_path / "tiny.beton"
    assert main(["convert", str(data), str(out), "--max-resolution", "128", "--workers", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "wrote 48 images" in captured.out and "1 unreadable image(s) left out" in captured.out
    assert "zz_cut.JPEG" in captured.err
    assert len(open_beton(out)) == 48
    assert main(["convert", str(data), str(out), "--no-progress"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["convert", str(data), str(tmp_path / "x.zip"), "--no-progress"]) == 2
    assert "should end in .beton" in capsys.readouterr().err


def test_bench_loader_fast_backends(capsys, tmp_path, tiny_data, tiny_beton):
    out = tmp_path / "bench.json"
    args = ["--batch-size", "8", "--image-size", "32", "--steps", "3", "--warmup", "1", "--workers", "1",
            "--device", "cpu"]
    assert main(["bench", "loader", "--backend", "dali", "--decode", "shared", "window", "--data", str(tiny_data),
                 *args, "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["backend"], r["decode"]) for r in runs] == [("dali", "shared"), ("dali", "window")]
    assert all(r["img_per_s"] > 0 for r in runs)
    assert main(["bench", "loader", "--backend", "ffcv", "--data", str(tiny_beton), *args, "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["backend"] == "ffcv" and record["img_per_s"] > 0
    assert "ffcv" in capsys.readouterr().out
