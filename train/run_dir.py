"""Run directories: `<out_dir>/<name>-<timestamp>/` with the resolved config,
`run.json` (software, machine, data), metrics, TensorBoard events, checkpoints."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from iecl.pipeline.errors import UserError
from iecl.train.config import Config, ConfigError, dump_yaml


class RunDirError(UserError, OSError):
    pass


def create_run_dir(cfg: Config) -> Path:
    base = Path(cfg.run.out_dir).expanduser()
    name = cfg.run.name or f"{cfg.method.name}-{cfg.model.backbone}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # Made under a hidden name with its config.yaml, then renamed: a folder of this
    # name is a run folder (one --resume can start) from its first moment, even if
    # the process is killed while making it.
    staging = base / f".{name}-{stamp}.new-{os.getpid()}"
    try:
        base.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        _write(staging / "config.yaml", dump_yaml(cfg))
        for k in range(1000):
            path = base / (f"{name}-{stamp}" + (f"-{k}" if k else ""))
            if path.exists():
                continue
            try:
                os.rename(staging, path)  # fails if another process took the name meanwhile
                return path
            except OSError:
                if not path.exists():
                    raise
        shutil.rmtree(staging, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise RunDirError(
            f"cannot create a run directory under {base}: {err.strerror}; set run.out_dir to a writable folder"
        ) from None
    raise RunDirError(f"too many runs named {name}-{stamp} in {base}")


def discard_if_unstarted(run_dir: Path) -> bool:
    """Remove a new run's folder whose start failed: no checkpoint and no
    logged step in it (what a failed start leaves, nothing worth keeping).
    A folder with either is kept. -> whether it was removed."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if (run_dir / "last.pt").exists() or (metrics.exists() and metrics.stat().st_size):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return not run_dir.exists()


def write_run_files(run_dir: Path, cfg: Config, info: dict, resumed: bool) -> None:
    """config.yaml (resolved) and run.json; a resume appends to run.json's history."""
    try:
        _write(run_dir / "config.yaml", dump_yaml(cfg))
        path = run_dir / "run.json"
        record = json.loads(path.read_text()) if resumed and path.exists() else {"sessions": []}
        record["sessions"].append({**_environment(cfg), **info, "resumed": resumed})
        _write(path, json.dumps(record, indent=1))
    except OSError as err:
        raise RunDirError(f"cannot write to the run directory {run_dir}: {err.strerror}") from None


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _environment(cfg: Config) -> dict:
    device = torch.device(cfg.train.device)
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
    }


def check_run_dir(run_dir: Path, checkpoint_bytes: int, keep_checkpoints: int = 0) -> list[str]:
    """Before training: the run directory takes new files (and its existing
    logs take appends), and its file system has room for the checkpoints. A
    `RunDirError` saying what to change otherwise; warnings (a list of lines)
    when the room may run out later (snapshots kept besides last.pt)."""
    run_dir = Path(run_dir)
    try:
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"\0")
        probe.unlink()
        for log in (run_dir / "metrics.jsonl", run_dir / "run.json"):
            if log.exists():
                open(log, "ab").close()  # opened to see that it can be; nothing is written
    except OSError as err:
        raise RunDirError(
            f"cannot write to the run directory {run_dir}: {err.strerror or err}; "
            "make it writable or start a new run with run.out_dir set to a writable folder"
        ) from None
    free = shutil.disk_usage(run_dir).free
    # A new run's second checkpoint is written beside its first (atomic write); a
    # resumed run's next one beside the last.pt already there.
    need = checkpoint_bytes * (1 if (run_dir / "last.pt").exists() else 2)
    if free < need:
        raise RunDirError(
            f"the file system of {run_dir} has {size_text(free)} free, but a checkpoint of this run takes about "
            f"{size_text(checkpoint_bytes)} and the atomic write needs room for two ({size_text(need)} more): "
            "free some space or set run.out_dir to a folder on another file system"
        )
    later = need + keep_checkpoints * checkpoint_bytes
    if free < later:
        return [(f"{run_dir} has {size_text(free)} free; keeping train.keep_checkpoints={keep_checkpoints} snapshots "
                 f"of about {size_text(checkpoint_bytes)} each may fill it (lower train.keep_checkpoints)")]
    return []


def size_text(n: float) -> str:
    """Bytes as B, KB, MB or GB, for messages."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"


def config_of_run(run_dir: Path) -> Path:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml in it)")
    return path
