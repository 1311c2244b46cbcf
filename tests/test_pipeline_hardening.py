"""Hostile data folders (issue 18): unreadable files named once, relative to the
data root; symlink loops and unreadable folders reported as bad entries, not
tracebacks; one decision of what is readable; EXIF orientation applied by every
decoder; loader workers that die with their parent."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import alive, descendants
from PIL import Image

from iecl.pipeline import (
    BatchPlan,
    LoaderSpec,
    build_loader,
    open_images,
    scan_image_folder,
)
from iecl.pipeline.augment import get_recipe
from iecl.pipeline.decode import decode_error, decode_rgb, inspect_image
from iecl.pipeline.validate import validate_images

CPU = torch.device("cpu")


def _copy(tiny_data: Path, root: Path, n: int = 9) -> Path:
    (root / "a").mkdir(parents=True)
    for i, src in enumerate(sorted((tiny_data / "class_0000").iterdir())[:n]):
        shutil.copyfile(src, root / "a" / f"ok{i}.JPEG")
    return root


def _pil(images, batch: int = 4, workers: int = 0):
    return build_loader(images, LoaderSpec("pil", BatchPlan(get_recipe("mocov2"), batch, 32, 0, workers, CPU)))


def _epochs(loader, epochs) -> list:
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out.extend(loader)
    return out


@pytest.fixture
def hostile(tmp_path, tiny_data):
    """Nine good JPEGs, a truncated one, a symlink loop as a class folder and as an image."""
    root = _copy(tiny_data, tmp_path / "hostile")
    data = (root / "a" / "ok3.JPEG").read_bytes()
    (root / "a" / "cut.JPEG").write_bytes(data[: len(data) // 3])
    os.symlink("loop.JPEG", root / "a" / "loop.JPEG")
    os.symlink("cycle", root / "cycle")
    return root


def test_symlink_loops_are_bad_entries_everywhere(hostile):
    images = scan_image_folder(hostile)
    assert len(images) == 10
    assert [name for name, _ in images.bad_entries] == ["a/loop.JPEG", "cycle"]
    assert all("symbolic links" in reason for _, reason in images.bad_entries)
    report = validate_images(images, workers=1, progress=False)
    assert report.checked == 12 and report.checked - len(report.unreadable) == 9
    assert [os.path.relpath(name, hostile) for name, _ in report.unreadable] == ["a/loop.JPEG", "cycle", "a/cut.JPEG"]
    assert report.non_images == []
    loader = _pil(images)
    _epochs(loader, [0])
    assert [name.split(" (")[0] for name in loader.bad_files] == ["a/loop.JPEG", "cycle", "a/cut.JPEG"]


def test_an_unreadable_folder_is_a_bad_entry(hostile, monkeypatch):
    """(Tests run as root, which reads any folder: the refusal is simulated.)"""
    (hostile / "b").mkdir()
    shutil.copyfile(hostile / "a" / "ok0.JPEG", hostile / "b" / "x.JPEG")
    real = os.scandir

    def scandir(path="."):
        if os.path.basename(os.fspath(path)) == "b":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    images = open_images(hostile)
    assert ("b", "cannot list the folder: Permission denied") in images.bad_entries
    assert len(images) == 10 and images.classes == ["a"]


def test_each_unreadable_file_is_named_once_relative_to_the_root(hostile):
    loader = _pil(open_images(hostile), workers=2)
    batches = _epochs(loader, [0, 1, 2])
    assert len(batches) == 3 * 2 and all(b.anchor.shape == (4, 32, 32, 3) for b in batches)
    assert len(loader.bad_files) == 3  # the same files every epoch: named once
    assert loader.bad_files[2].startswith("a/cut.JPEG (") and "truncated" in loader.bad_files[2]
    loader.close()


def test_relative_names_for_lists_and_shards(tmp_path, tiny_data):
    root = _copy(tiny_data, tmp_path / "d", n=2)
    (tmp_path / "list.txt").write_text("d/a/ok0.JPEG\nd/a/ok1.JPEG\n")
    listed = open_images(tmp_path / "list.txt")
    assert [listed.relative_name(i) for i in range(2)] == ["d/a/ok0.JPEG", "d/a/ok1.JPEG"]
    folder = open_images(root)
    assert folder.relative_name(0) == "a/ok0.JPEG"


def _exif_jpeg(orientation: int, size=(60, 40)) -> bytes:
    """A JPEG of `size` pixels, left half red, with EXIF orientation `orientation`."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2, 0] = 255
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_applied_and_sizes_are_upright():
    for orientation, upright in ((1, (60, 40)), (3, (60, 40)), (6, (40, 60)), (8, (40, 60))):
        data = _exif_jpeg(orientation)
        assert inspect_image(data) == upright == decode_rgb(data).size
    turned = np.asarray(decode_rgb(_exif_jpeg(6)))  # 90 degrees clockwise: the red half on top
    assert turned[:20, :, 0].mean() > 200 and turned[40:, :, 0].mean() < 50


def test_one_readability_decision():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    assert "not decoded by every backend" in decode_error(buf.getvalue())
    with pytest.raises(ValueError, match="every backend"):
        decode_rgb(buf.getvalue())
    assert decode_error(_exif_jpeg(6)) is None


_HOLD_LOADER = """
import os, sys, tarfile, time, torch
from iecl.pipeline import BatchPlan, LoaderSpec, build_loader, open_images
from iecl.pipeline.augment import get_recipe
from iecl.pipeline.spec import DaliOptions
backend, data = sys.argv[1], sys.argv[2]
plan = BatchPlan(get_recipe("mocov2"), 4, 32, 0, 2, torch.device("cpu"))
loader = build_loader(open_images(data), LoaderSpec(backend, plan, dali=DaliOptions(index_cache=None)))
loader.set_epoch(0)
next(iter(loader))
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads children from Linux's /proc")
@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_workers_die_with_a_killed_parent(backend, tmp_path, tiny_data):
    """SIGKILL a process holding a loader with worker processes: none survives it
    (DALI's Python workers serve tar shards, so the data is a shard here)."""
    import signal
    import subprocess
    import sys
    import tarfile
    import time

    if backend == "dali":
        pytest.importorskip("nvidia.dali")
        data = tmp_path / "s.tar"
        with tarfile.open(data, "w") as tar:
            for i, path in enumerate(sorted((tiny_data / "class_0000").iterdir())[:12]):
                tar.add(path, arcname=f"{i:04d}.jpg")
    else:
        data = tiny_data
    script = tmp_path / "hold.py"
    script.write_text(_HOLD_LOADER)
    proc = subprocess.Popen([sys.executable, str(script), backend, str(data)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HOME": str(tmp_path)})
    children: set[int] = set()
    try:
        assert proc.stdout.readline().strip() == "ready"
        children = descendants(proc.pid)
        assert len(children) >= 2  # the two workers (and any helper process)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # (PyTorch's workers check on their parent every 5 s; the kernel's signal is immediate)
        deadline = time.monotonic() + 3
        while any(alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [c for c in children if alive(c)]
    finally:
        proc.kill()
        for child in children:  # survivors of a failure: not left running
            if alive(child):
                os.kill(child, signal.SIGKILL)
