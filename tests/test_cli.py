"""The `iecl` command line: what a user types, what they see, what is left on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import tiny_config, tiny_overrides

from iecl.pipeline import scan_image_folder
from iecl.pipeline.sampler import EpochBatchSampler
from iecl.train import checkpoint as ckpt
from iecl.train.cli import main
from iecl.train.metrics import read_metrics

TINY = tiny_overrides()


def _pretrain(capsys, *args, tiny: bool = True) -> tuple[int, str, str]:
    """`iecl pretrain` in-process; with `tiny`, the TINY settings come first so `args` override them."""
    code = main(["pretrain", "--no-progress", *(TINY if tiny else []), *args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _run_dirs(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.iterdir() if p.is_dir()) if out_dir.exists() else []


@pytest.mark.slow
def test_pretrain_writes_a_complete_run(capsys, tmp_path, tiny_data):
    out_dir = tmp_path / "runs"
    code, out, _ = _pretrain(capsys, f"data.root={tiny_data}", f"run.out_dir={out_dir}", "train.epochs=1")
    assert code == 0
    (run_dir,) = _run_dirs(out_dir)
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "run.json", "metrics.jsonl", "tb", "last.pt"}
    assert "done: 6 steps (1.00 epochs)" in out and "images/s" in out and "final loss" in out and str(run_dir) in out
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 7))
    assert ckpt.load(run_dir / "last.pt")["step"] == 6
    # Resuming a finished run says so and changes nothing.
    code, out, _ = _pretrain(capsys, "--resume", str(run_dir), tiny=False)
    assert code == 0 and "already complete" in out


def test_missing_data_folder(capsys, tmp_path):
    out_dir = tmp_path / "runs"
    code, _, err = _pretrain(capsys, f"data.root={tmp_path / 'nowhere'}", f"run.out_dir={out_dir}")
    assert code == 2
    assert _one_line_error(err).startswith(f"iecl pretrain: error: data folder {tmp_path / 'nowhere'} does not exist")
    assert not out_dir.exists()  # nothing written


def test_empty_data_folder(capsys, tmp_path):
    (tmp_path / "empty" / "some_class").mkdir(parents=True)
    code, _, err = _pretrain(capsys, f"data.root={tmp_path / 'empty'}", f"run.out_dir={tmp_path / 'runs'}")
    assert code == 2 and "no images found" in _one_line_error(err)


def test_dataset_smaller_than_a_batch(capsys, tmp_path, tiny_data):
    out_dir = tmp_path / "runs"
    code, _, err = _pretrain(capsys, f"data.root={tiny_data}", f"run.out_dir={out_dir}", "train.batch_size=64")
    assert code == 2
    assert "the dataset has 48 images, fewer than one batch of 64" in _one_line_error(err)
    assert not out_dir.exists()  # refused before a run directory is made


def test_unknown_config_key(capsys, tmp_path):
    code, _, err = _pretrain(capsys, "train.epochz=3", f"run.out_dir={tmp_path}")
    assert code == 2
    assert _one_line_error(err) == (
        "iecl pretrain: error: unknown config key 'train.epochz' (did you mean 'train.epochs'?)"
    )


def test_unwritable_run_directory(capsys, tmp_path, tiny_data):
    if os.geteuid() == 0:
        blocked = tmp_path / "a_file"  # root ignores permissions: use a path under a regular file
        blocked.write_text("")
        out_dir = blocked / "runs"
    else:
        out_dir = tmp_path / "read_only"
        out_dir.mkdir(mode=0o500)
    code, _, err = _pretrain(capsys, f"data.root={tiny_data}", f"run.out_dir={out_dir}")
    assert code == 2 and "cannot create a run directory" in _one_line_error(err)


@contextmanager
def _read_only(path: Path):
    """`path` (a folder or a file) unwritable for this process: chmod for a
    user; root ignores permissions, so for root the immutable attribute
    (chattr +i), and a skip only where the file system has none."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o500 if path.is_dir() else 0o400)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True, check=False).returncode:
        pytest.skip("running as root, which ignores permissions, and chattr +i does not work here")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


def _one_step_run(capsys, out_dir: Path, tiny_data) -> Path:
    """A run stopped after its first step (train.max_steps=1), to be resumed with more."""
    code, _, err = _pretrain(capsys, f"data.root={tiny_data}", f"run.out_dir={out_dir}", "train.max_steps=1")
    assert code == 0, err
    (run_dir,) = _run_dirs(out_dir)
    return run_dir


def test_read_only_parent_of_new_runs(capsys, tmp_path, tiny_data):
    out_dir = tmp_path / "runs"
    out_dir.mkdir()
    with _read_only(out_dir):
        code, _, err = _pretrain(capsys, f"data.root={tiny_data}", f"run.out_dir={out_dir}")
    assert code == 2 and "cannot create a run directory under" in _one_line_error(err)
    assert not list(out_dir.iterdir())


def test_read_only_run_directory_is_refused_before_resuming(capsys, tmp_path, tiny_data):
    run_dir = _one_step_run(capsys, tmp_path / "runs", tiny_data)
    before = (run_dir / "last.pt").read_bytes()
    with _read_only(run_dir):
        code, _, err = _pretrain(capsys, "--resume", str(run_dir), "train.max_steps=2", tiny=False)
    assert code == 2
    assert _one_line_error(err).startswith(f"iecl pretrain: error: cannot write to the run directory {run_dir}")
    assert (run_dir / "last.pt").read_bytes() == before


def test_unwritable_metrics_log_is_refused_before_training(capsys, tmp_path, tiny_data):
    """The folder takes new files but the metrics log takes no appends: refused
    by the check before training, not by a traceback at the first logged step."""
    run_dir = _one_step_run(capsys, tmp_path / "runs", tiny_data)
    with _read_only(run_dir / "metrics.jsonl"):
        code, _, err = _pretrain(capsys, "--resume", str(run_dir), "train.max_steps=2", tiny=False)
    assert code == 2 and f"cannot write to the run directory {run_dir}" in _one_line_error(err)
    assert ckpt.load(run_dir / "last.pt")["step"] == 1


def test_too_little_disk_space_is_refused_before_training(capsys, tmp_path, tiny_data, monkeypatch):
    from iecl.train import run_dir as run_dir_module

    free = 5 * 2**20  # a ResNet-18 IE-CL checkpoint with AdamW state is ~200 MB
    monkeypatch.setattr(run_dir_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40 - free, free))
    out_dir = tmp_path / "runs"
    code, _out, err = _pretrain(capsys, f"data.root={tiny_data}", f"run.out_dir={out_dir}")
    line = _one_line_error(err)
    assert code == 2 and "has 5.0 MB free, but a checkpoint of this run takes about" in line and "run.out_dir" in line
    assert _run_dirs(out_dir) == []  # a start that fails leaves no run folder behind


@pytest.mark.slow
def test_a_failing_checkpoint_write_keeps_the_previous_one(capsys, tmp_path, tiny_data, monkeypatch):
    """The disk fills while step 4's checkpoint is half written: a one-line
    error, and last.pt still holds step 2, loadable; no temporary is left."""
    import torch

    real_save, calls = torch.save, []

    def fill_the_disk_on_the_second_save(obj, f, *args, **kwargs):
        calls.append(obj["step"])
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fill_the_disk_on_the_second_save)
    out_dir = tmp_path / "runs"
    code, _, err = _pretrain(capsys, f"data.root={tiny_data}", f"run.out_dir={out_dir}", "train.checkpoint_every=2")
    monkeypatch.undo()
    (run_dir,) = _run_dirs(out_dir)
    assert code == 2 and calls == [2, 4]
    assert _one_line_error(err) == (
        f"iecl pretrain: error: cannot write the checkpoint of step 4 to {run_dir}: No space left on device; "
        f"{run_dir / 'last.pt'} still holds step 2: free space (or fix the folder) and continue with --resume {run_dir}"
    )
    assert ckpt.load(run_dir / "last.pt")["step"] == 2
    assert not [p.name for p in run_dir.iterdir() if "tmp" in p.name]


@pytest.mark.slow
def test_unreadable_image_mid_run_keeps_progress(capsys, tmp_path, tiny_data):
    """With no unreadable images allowed, the run stops with the file's name
    before training on its batch; the steps already done are in last.pt."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    (root / "class_0002" / "zz_broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    images = scan_image_folder(root)
    bad = next(i for i, (path, _) in enumerate(images.samples) if path.endswith("zz_broken.JPEG"))
    # A seed whose first epoch reaches the broken file after at least two good batches.
    for seed in range(100):
        sampler = EpochBatchSampler(len(images), 8, seed)
        order = sampler.indices(0).tolist()
        if bad in order and order.index(bad) // 8 >= 2:
            break
    steps_before = order.index(bad) // 8
    out_dir = tmp_path / "runs"
    code, _, err = _pretrain(
        capsys, f"data.root={root}", f"run.out_dir={out_dir}", f"run.seed={seed}", "data.max_bad_images=0"
    )
    assert code == 2
    line = _one_line_error(err)
    assert "zz_broken.JPEG" in line and "--resume" in line and "iecl validate" in line
    (run_dir,) = _run_dirs(out_dir)
    assert ckpt.load(run_dir / "last.pt")["step"] == steps_before
    assert (run_dir / "config.yaml").exists()


@pytest.mark.slow
def test_unreadable_images_are_replaced_counted_and_reported(capsys, tmp_path, tiny_data):
    """By default a run survives a few bad files: each is named once on stderr,
    counted in metrics.jsonl and in the summary, and no batch is lost."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    (root / "class_0002" / "zz_broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "class_0003" / "zz_text.JPEG").write_text("not an image")
    out_dir = tmp_path / "runs"
    code, out, err = _pretrain(capsys, f"data.root={root}", f"run.out_dir={out_dir}", "train.epochs=1")
    assert code == 0
    assert err.count("zz_broken.JPEG") == 1 and err.count("zz_text.JPEG") == 1
    assert "2 unreadable image(s) replaced" in out and "done: 6 steps" in out  # 50 images, batch 8
    (run_dir,) = _run_dirs(out_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["bad_images"] == 2 and rows[0]["bad_images"] <= 2


def test_resume_errors(capsys, tmp_path):
    code, _, err = _pretrain(capsys, "--resume", str(tmp_path), tiny=False)
    assert code == 2 and "is not a run directory" in _one_line_error(err)
    code, _, err = _pretrain(capsys, "--resume", str(tmp_path), "--config", "smoke", tiny=False)
    assert code == 2 and "drop --config" in _one_line_error(err)


def test_make_synthetic(capsys, tmp_path):
    assert main(["make-synthetic", str(tmp_path / "syn"), "--images", "6", "--classes", "2", "--workers", "1"]) == 0
    assert "wrote 6 images in 2 classes" in capsys.readouterr().out
    assert len(scan_image_folder(tmp_path / "syn")) == 6
    assert main(["make-synthetic", str(tmp_path / "syn"), "--images", "6", "--classes", "2"]) == 0
    assert "already holds this dataset" in capsys.readouterr().out
    assert main(["make-synthetic", str(tmp_path / "bad"), "--images", "2", "--classes", "5"]) == 2
    assert "need at least as many images" in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("argv", [["--help"], ["pretrain", "--help"], ["make-synthetic", "--help"]])
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0 and "usage: iecl" in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_saves_and_exits_143(tmp_path, tiny_data):
    """A scheduler's SIGTERM (preemption) to a real training process: a clean
    exit with status 143 and a loadable checkpoint at a step boundary."""
    out_dir = tmp_path / "runs"
    args = [*TINY, f"data.root={tiny_data}", f"run.out_dir={out_dir}", "train.epochs=3"]
    proc = subprocess.Popen([sys.executable, "-m", "iecl.train", "--no-progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(out_dir.glob("*/metrics.jsonl"))
        if found and found[0].read_text().strip():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in out and "Traceback" not in err
    (run_dir,) = _run_dirs(out_dir)
    state = ckpt.load(run_dir / "last.pt")
    assert 1 <= state["step"] < 18
    assert read_metrics(run_dir)[-1]["step"] <= state["step"]


@pytest.mark.slow
def test_sigint_saves_at_a_step_boundary_and_resume_matches(tmp_path, tiny_data):
    """A real Ctrl-C to a real training process, then `--resume`: the metrics of
    the interrupted-and-resumed run equal those of an uninterrupted one."""
    out_dir = tmp_path / "runs"
    args = [*TINY, f"data.root={tiny_data}", f"run.out_dir={out_dir}", "train.epochs=3"]
    threads = str(min(2, os.cpu_count() or 1))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    command = [sys.executable, "-m", "iecl.train", "--no-progress"]
    proc = subprocess.Popen([*command, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    metrics = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(out_dir.glob("*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 3:
            metrics = found[0]
            break
        time.sleep(0.05)
    assert metrics is not None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in out and "Traceback" not in err
    run_dir = metrics.parent
    stopped_at = ckpt.load(run_dir / "last.pt")["step"]
    assert 3 <= stopped_at < 18

    resumed = subprocess.run([*command, "--resume", str(run_dir)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {stopped_at}" in resumed.stdout
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 19))

    from iecl.train.loop import pretrain

    reference = tmp_path / "reference"
    reference.mkdir()
    pretrain(tiny_config(tiny_data, tmp_path, {"train": {"epochs": 3}}), reference, scan_image_folder(tiny_data),
             progress=False)
    expected = read_metrics(reference)
    for row, want in zip(rows, expected):
        assert (row["step"], row["loss"], row["lr"]) == (want["step"], want["loss"], want["lr"])


# ------------------------------------------------------------- help and argument errors are fast

#: argv -> exit status: top-level help and errors, and profiling's commands' own
FAST = {("--help",): 0, (): 2, ("pretrian",): 2, ("bench", "--help"): 0, ("bench", "saib", "--help"): 0,
        ("bench", "loader", "--help"): 0, ("bench", "loader"): 2, ("profile", "--steps", "x"): 2,
        ("compare", "--help"): 0, ("compare", "--bogus"): 2, ("report", "--help"): 0}

_FAST_CHECK = """
import contextlib, io, json, runpy, sys
root, cases = sys.argv[1], json.loads(sys.argv[2])
codes = []
for argv in cases:
    sys.argv = ["iecl", *argv]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                import iecl  # installed (pip install -e .): python -m iecl
                runpy.run_module("iecl", run_name="__main__", alter_sys=True)
            except ModuleNotFoundError:  # a plain checkout: python3 CHECKOUT
                runpy.run_path(root + "/__main__.py", run_name="__main__")
        codes.append(None)
    except SystemExit as err:
        codes.append(err.code)
print(json.dumps({"codes": codes, "heavy": sorted(m for m in ("torch", "numpy", "iecl.train.cli") if m in sys.modules)}))
"""


def test_help_and_argument_errors_do_not_import_torch(tmp_path):
    """`iecl --help`, a misspelt command and profiling's commands' help and
    argument errors answer without importing torch (seconds on a busy machine)."""
    root = Path(__file__).resolve().parent.parent
    cases = [list(argv) for argv in FAST]
    run = subprocess.run([sys.executable, "-c", _FAST_CHECK, str(root), json.dumps(cases)], check=False,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["codes"] == list(FAST.values())
    assert result["heavy"] == []


def test_the_light_top_level_help_is_the_full_one(capsys):
    """iecl.cli lists train's commands from TRAIN_COMMANDS without importing
    them: the list must read as train.cli's own parser has it."""
    from iecl.cli import light_parser
    from iecl.profiling.cli import COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"], extra_commands=COMMANDS)  # the full parser
    assert capsys.readouterr().out == light_parser().format_help()


def test_the_parsers_lists_agree_with_what_they_name():
    from iecl.profiling import bench_saib, cli, compare
    from iecl.train.step import DTYPES

    assert set(cli.PRECISIONS) == set(DTYPES)
    assert cli.SAIB_IMPLS == bench_saib.IMPLS
    assert set(cli.SAIB_CHOICES) == set(compare.SAIB_MODES)


def test_bench_help_shows_the_defaults(capsys):
    from iecl.cli import main as iecl_main

    for bench, expected in (("loader", ("(default: 256)", "(default: pil)", "(default: 0)")),
                            ("saib", ("(default: 50)", "(default: bf16)", "(default: 16)"))):
        with pytest.raises(SystemExit):
            iecl_main(["bench", bench, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for default in expected:
            assert default in text, (bench, default)
        assert "(default: None)" not in text
