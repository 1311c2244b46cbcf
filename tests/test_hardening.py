"""A long run survives its own bad data, full disks, preemption at any moment
and hostile input: the failures a hostile user found, each as a test."""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import alive, descendants, tiny_config, tiny_overrides

from iecl.pipeline import scan_image_folder
from iecl.train import checkpoint as ckpt
from iecl.train.cli import main
from iecl.train.metrics import MetricsLog, MetricsWriteError, read_metrics
from iecl.train.run_dir import create_run_dir
from iecl.train.run_lock import RunLock
from iecl.train.signals import Interrupted, StopRequest

TINY = tiny_overrides()


def _pretrain(capsys, *args) -> tuple[int, str, str]:
    code = main(["pretrain", "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "warning" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _run_folders(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) if out_dir.exists() else []


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


# ------------------------------------------------------------------ checkpoints


def _saved(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


@pytest.mark.parametrize("damage,message", [
    (lambda s: s.pop("optimizer"), "optimizer is missing"),
    (lambda s: s.update(step="3"), "step is a str"),
    (lambda s: s["rng"].update(numpy=5), "rng.numpy is a int, not a mapping"),
    (lambda s: s["dataset"].pop("images"), "dataset.images is missing"),
    (lambda s: s.pop("bad_files"), "bad_files is missing"),
])
def test_an_incomplete_checkpoint_is_one_line_naming_what_is_missing(tiny_checkpoint, tmp_path, capsys, damage,
                                                                      message):
    state = ckpt.load(tiny_checkpoint / "last.pt")
    damage(state)
    path = _saved(state, tmp_path / "damaged.pt")
    with pytest.raises(ckpt.CheckpointError, match=f"not a complete iecl checkpoint \\(format 2\\): {message}"):
        ckpt.load(path)
    # Every command that reads checkpoints says so in one line.
    assert main(["export", str(path), "--out", str(tmp_path / "out.pt")]) == 2
    assert message in _one_line(capsys.readouterr().err)


def test_checkpoint_formats(tiny_checkpoint, tmp_path):
    state = ckpt.load(tiny_checkpoint / "last.pt")
    assert state["format"] == ckpt.FORMAT == 2 and state["bad_files"] == []
    old = {k: v for k, v in state.items() if k != "bad_files"} | {"format": 1}
    assert ckpt.load(_saved(old, tmp_path / "v1.pt"))["bad_files"] == []  # read, with no bad files
    with pytest.raises(ckpt.CheckpointError, match="format 99; this iecl reads formats 1, 2"):
        ckpt.load(_saved(state | {"format": 99}, tmp_path / "v99.pt"))


def test_a_failed_checkpoint_write_in_torch_is_an_os_error_and_keeps_the_last(tmp_path, tiny_checkpoint, monkeypatch):
    """torch.save reports a full disk as a RuntimeError from its zip writer."""
    path = tmp_path / "last.pt"
    shutil.copy(tiny_checkpoint / "last.pt", path)
    before = path.read_bytes()

    def full(obj, f, *args, **kwargs):
        f.write(b"part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="the write failed .*unexpected pos 704 vs 598.*is the disk full"):
        ckpt.save_atomic({"step": 9}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_stale_temporaries_are_removed(tmp_path):
    for name in (".last.pt.tmp-4242", ".step-00000004.pt.tmp-4243"):
        (tmp_path / name).write_bytes(b"half")
    (tmp_path / "last.pt").write_bytes(b"kept")
    removed = ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".last.pt.tmp-4242", ".step-00000004.pt.tmp-4243"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ------------------------------------------------------------------ the metrics log


def test_a_partial_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 6, "lo')  # the disk filled mid-row
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    log = MetricsLog(tmp_path, resume_step=5)
    log.log({"step": 6, "loss": 0.5})
    log.close()
    assert "dropped 1 damaged line(s)" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_a_failed_metrics_write_is_one_line(tmp_path):
    log = MetricsLog(tmp_path)

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    log.file = Full()
    with pytest.raises(MetricsWriteError, match="cannot append step 3's row to .*metrics.jsonl: No space left on device; "
                                                "free space .* --resume"):
        log.log({"step": 3, "loss": 1.0})
    log.close()  # the write already failed and was reported: closing does not raise again


@pytest.mark.slow
def test_a_full_disk_during_a_real_run_is_one_line_and_leaves_no_partial_file(tmp_path, tiny_data):
    """A file-size limit (the kernel's EFBIG, as a full disk's ENOSPC) that the
    first checkpoint hits: a one-line error, no temporary left, the run resumable."""
    out_dir = tmp_path / "runs"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, 4 * 2**20))  # logs fit, a checkpoint does not

    proc = subprocess.run([sys.executable, "-m", "iecl.train", "--no-progress", *TINY, f"data.root={tiny_data}",
                           f"run.out_dir={out_dir}", "train.max_steps=2"], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit_file_size, check=False)
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert "cannot write the checkpoint of step 2" in line and "no checkpoint was written" in line, line
    (run_dir,) = _run_folders(out_dir)
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


# ------------------------------------------------------------------ resume, locks, start-up


@pytest.mark.slow
def test_a_refused_resume_changes_nothing(capsys, tmp_path, tiny_data):
    out_dir = tmp_path / "runs"
    code, _, err = _pretrain(capsys, *TINY, f"data.root={tiny_data}", f"run.out_dir={out_dir}", "train.max_steps=1")
    assert code == 0, err
    (run_dir,) = _run_folders(out_dir)
    before = _files(run_dir)
    code, _, err = _pretrain(capsys, "--resume", str(run_dir), "train.batch_size=16", "train.max_steps=2")
    assert code == 2 and "changes train.batch_size from 8 to 16" in _one_line(err)
    assert _files(run_dir) == before  # config.yaml, run.json, metrics, last.pt: untouched
    code, out, err = _pretrain(capsys, "--resume", str(run_dir), "train.max_steps=2")
    assert code == 0 and "resuming at step 1" in out, err


def test_a_second_process_in_a_run_folder_is_refused(capsys, tmp_path, tiny_data):
    cfg = tiny_config(tiny_data, tmp_path)
    run_dir = create_run_dir(cfg)
    lock = RunLock(run_dir).acquire()  # as a training process holds it
    try:
        before = _files(run_dir)
        code, _, err = _pretrain(capsys, "--resume", str(run_dir))
        assert code == 2
        assert f"{run_dir} is in use: process {os.getpid()} on" in _one_line(err)
        assert _files(run_dir) == before
    finally:
        lock.release()
    assert not (run_dir / "lock").exists()


def test_a_lock_of_a_dead_process_is_free(tmp_path):
    script = ("import sys, time; sys.path[:0] = sys.argv[2:]; from iecl.train.run_lock import RunLock; "
              "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), *sys.path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match=f"process {holder.pid} on"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).acquire().release()  # the kernel freed the dead holder's lock


@pytest.mark.slow
def test_a_run_folder_without_a_checkpoint_starts_afresh_and_loses_its_stale_files(capsys, tmp_path, tiny_data):
    """What preemption before the first checkpoint leaves: --resume proceeds."""
    cfg = tiny_config(tiny_data, tmp_path / "runs", {"train": {"max_steps": 2}})
    run_dir = create_run_dir(cfg)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")  # a row of the lost start
    (run_dir / ".last.pt.tmp-99999").write_bytes(b"half a checkpoint")
    code, out, err = _pretrain(capsys, "--resume", str(run_dir))
    assert code == 0, err
    assert "has no checkpoint yet" in err and "new run" in out
    assert ckpt.load(run_dir / "last.pt")["step"] == 2
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2] and read_metrics(run_dir)[0]["loss"] != 9.0
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


def test_a_failed_start_leaves_no_run_folder(capsys, tmp_path, tiny_data, monkeypatch):
    from iecl.train import loop

    def no_loader(*args, **kwargs):
        raise Interrupted("SIGTERM", "stopped by SIGTERM before training started (nothing to save)")

    monkeypatch.setattr(loop, "knn_splits", no_loader)  # a signal in pretrain's own start-up
    out_dir = tmp_path / "runs"
    code, _, err = _pretrain(capsys, *TINY, f"data.root={tiny_data}", f"run.out_dir={out_dir}")
    assert code == 143 and _one_line(err) == "iecl pretrain: stopped by SIGTERM before training started (nothing to save)"
    assert _run_folders(out_dir) == [] and not list(out_dir.iterdir())


def test_a_second_sigint_exits_at_once_without_saving():
    stop = StopRequest()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == "SIGINT"  # the first asks for a stop at the step boundary
        with pytest.raises(Interrupted, match="a second Ctrl-C: exiting now, without saving") as second:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes: at once
    assert second.value.exit_status == 130


def test_print_config_resolves_and_writes_nothing(capsys, tmp_path):
    code, out, _ = _pretrain(capsys, "--print-config", *TINY, f"run.out_dir={tmp_path / 'runs'}")
    assert code == 0 and out.startswith("# iecl pretrain would a new run: iecl resnet18 +SAIB, data.backend=pil, cpu fp32")
    assert "  device: cpu\n" in out and "  precision: fp32\n" in out and "  lambda_entropy: " in out
    assert not (tmp_path / "runs").exists()


def test_a_step_that_cannot_fit_in_memory_is_refused_at_start_with_the_estimate(capsys, tmp_path, tiny_data):
    out_dir = tmp_path / "runs"
    code, _, err = _pretrain(capsys, *TINY, f"data.root={tiny_data}", f"run.out_dir={out_dir}",
                             "data.image_size=8192", "saib.enabled=false", "train.batch_size=32")
    line = _one_line(err)
    assert code == 2 and "keeps at least" in line and "GB of activations" in line and "lower data.image_size" in line
    assert not out_dir.exists()


# ------------------------------------------------------------------ bad images


@pytest.mark.slow
def test_one_bad_file_counts_once_across_epochs_and_resumes(capsys, tmp_path, tiny_data):
    """One corrupt JPEG, met every epoch, must not add up to data.max_bad_images."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    (root / "class_0001" / "zz_broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out_dir = tmp_path / "runs"
    code, out, err = _pretrain(capsys, *TINY, f"data.root={root}", f"run.out_dir={out_dir}", "train.epochs=2",
                               "data.max_bad_images=1")
    assert code == 0, err
    assert err.count("zz_broken.JPEG") == 1 and "1 unreadable image(s)" in out
    (run_dir,) = _run_folders(out_dir)
    assert [Path(n.split(" (")[0]).name for n in ckpt.load(run_dir / "last.pt")["bad_files"]] == ["zz_broken.JPEG"]
    code, out, err = _pretrain(capsys, "--resume", str(run_dir), "train.epochs=3")
    assert code == 0, err
    assert "zz_broken.JPEG" not in err and read_metrics(run_dir)[-1]["bad_images"] == 1


# ------------------------------------------------------------------ preemption at any moment


@pytest.mark.slow
def test_random_kills_never_break_a_run(tmp_path, tiny_data):
    """SIGKILLs and SIGTERMs at random moments (start-up, steps, checkpoint
    writes) of a run restarted the way the README's SLURM recipe restarts it.
    After every kill: each checkpoint loads and no child process survives;
    every restart proceeds; the finished run leaves no temporary file and
    logs the losses of an uninterrupted run."""
    out_dir = tmp_path / "runs"
    settings = [*TINY, f"data.root={tiny_data}", "train.epochs=2", "train.checkpoint_every=2",
                "train.keep_checkpoints=2", "data.workers=1"]
    threads = str(min(2, os.cpu_count() or 1))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    def restart() -> list[str]:  # as the SLURM recipe restarts: resume the run folder if there is one
        runs = _run_folders(out_dir)
        return ["--resume", str(runs[0])] if runs else [*settings, f"run.out_dir={out_dir}"]

    def watch(proc, children: set[int], until: float, done=lambda: False) -> None:
        """Note the trainer's children until the clock passes `until`, done() holds or it ends."""
        while time.monotonic() < until and not done() and proc.poll() is None:
            children |= descendants(proc.pid)
            time.sleep(0.02)

    rng = random.Random(18)
    for attempt in range(4):
        start = restart()
        proc = subprocess.Popen([sys.executable, "-m", "iecl.train", "--no-progress", *start], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        children: set[int] = set()
        # The first kill counts from the launch, so it may land in start-up. A later fresh start counts
        # from its run folder's appearance: on a slow machine every kill could otherwise land before
        # the run exists, and no kill would hit a step or a checkpoint write.
        if attempt and start[0] != "--resume":
            watch(proc, children, time.monotonic() + 120, lambda: bool(_run_folders(out_dir)))
        watch(proc, children, time.monotonic() + rng.uniform(0.3, 6.0))
        if proc.poll() is not None:  # ended by itself: only by finishing
            assert proc.returncode == 0, proc.stderr.read()
            break
        children |= descendants(proc.pid)
        sig = signal.SIGKILL if attempt % 2 == 0 or rng.random() < 0.5 else signal.SIGTERM
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        # -SIGTERM: before Python ran any of ours; 0: the run ended as the signal came
        assert proc.returncode in (-signal.SIGKILL, -signal.SIGTERM, 143, 0), err
        assert "Traceback" not in err, err
        give_up = time.monotonic() + 15
        while any(alive(c) for c in children) and time.monotonic() < give_up:
            time.sleep(0.1)
        assert not [c for c in children if alive(c)], f"children of a killed trainer survive ({sig.name})"
        for run in _run_folders(out_dir):
            for path in [*run.glob("last.pt"), *run.glob("step-*.pt")]:
                ckpt.load(path)
    final = subprocess.run([sys.executable, "-m", "iecl.train", "--no-progress", *restart()], env=env,
                           capture_output=True, text=True, timeout=300, check=False)
    assert final.returncode == 0, final.stderr
    (run_dir,) = _run_folders(out_dir)
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name or p.name == "lock"]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))

    from iecl.train.loop import pretrain

    reference = tmp_path / "reference"
    reference.mkdir()
    pretrain(tiny_config(tiny_data, tmp_path, {"train": {"epochs": 2}, "data": {"workers": 1}}), reference,
             scan_image_folder(tiny_data), progress=False)
    for row, want in zip(rows, read_metrics(reference), strict=True):
        assert (row["step"], row["loss"], row["lr"]) == (want["step"], want["loss"], want["lr"])


@pytest.mark.parametrize("label", [b"99999999999999999999999", b"-3", b"seven"])
def test_a_bad_class_label_in_a_tar_shard_is_a_data_error(tmp_path, tiny_data, label):
    import io
    import tarfile

    from iecl.pipeline import DataError, open_images

    jpeg = next(tiny_data.rglob("*.JPEG")).read_bytes()
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("a.jpg", jpeg), ("a.cls", label)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="should hold a class label from 0 to 2147483647"):
        open_images(str(shard))
