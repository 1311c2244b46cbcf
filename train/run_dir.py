"""Run directories: `<out_dir>/<name>-<timestamp>/` with the resolved config,
`run.json` (software, machine, data), metrics, TensorBoard events, checkpoints."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from train.config import Config, ConfigError, dump_yaml


class RunDirError(OSError):
    pass


def create_run_dir(cfg: Config) -> Path:
    base = Path(cfg.run.out_dir).expanduser()
    name = cfg.run.name or f"{cfg.method.name}-{cfg.model.backbone}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        base.mkdir(parents=True, exist_ok=True)
        for k in range(1000):
            path = base / (f"{name}-{stamp}" + (f"-{k}" if k else ""))
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as err:
        raise RunDirError(
            f"cannot create a run directory under {base}: {err.strerror}; set run.out_dir to a writable folder"
        ) from None
    raise RunDirError(f"too many runs named {name}-{stamp} in {base}")


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


def config_of_run(run_dir: Path) -> Path:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml in it)")
    return path
