"""Checkpoints: written atomically, loadable with `weights_only=True`.

A checkpoint is written to a temporary file in the same folder, flushed to
disk, then renamed over the old one: a crash or a full disk mid-write leaves
the previous `last.pt` intact, never a truncated one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from iecl.pipeline.errors import UserError

#: The checkpoint schema's version. 2 added `bad_files` (the unreadable images
#: met so far, so the count survives a resume); 1 is still read (no bad files).
FORMAT = 2
READABLE_FORMATS = (1, 2)

_TENSOR, _NUMBER = torch.Tensor, (int, float)
#: What every checkpoint holds, and of which type: checked on every load, so a
#: file that unpickles but lacks a key fails in one line naming it, not later
#: in a traceback.
SCHEMA = {
    "format": int, "step": int, "epoch": int, "batch_in_epoch": int, "world_size": int,
    "method": dict, "optimizer": dict, "scaler": dict, "config": dict,
    "rng": {"torch": _TENSOR, "numpy": {"keys": _TENSOR, "pos": int, "has_gauss": int, "cached_gaussian": _NUMBER},
            "python": list, "python_gauss": (float, type(None))},
    "dataset": {"root": str, "images": int},
}
ADDED_IN = {"bad_files": (2, list)}


class CheckpointError(UserError, RuntimeError):
    pass


def save_atomic(state: dict, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            try:
                torch.save(state, f)
            except RuntimeError as err:  # torch's zip writer reports a failed write (ENOSPC, EFBIG) this way
                raise OSError(f"the write failed ({_first_line(err)}); is the disk full?") from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


#: Optimizer state per trainable parameter, in parameter-sized tensors, before
#: the first step creates it: AdamW's two moments, SGD's and LARS's momentum.
OPTIMIZER_SLOTS = {"adamw": 2, "sgd": 1, "lars": 1}


def estimate_bytes(method: torch.nn.Module, optimizer: torch.optim.Optimizer, optimizer_name: str) -> int:
    """About what one checkpoint of this run takes on disk: the method's
    parameters and buffers (target encoder, queue, BatchNorm statistics) plus
    the optimizer's state (actual once it exists, else predicted)."""
    model = sum(t.numel() * t.element_size() for t in method.state_dict().values() if isinstance(t, torch.Tensor))
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    if state:
        return model + sum(t.numel() * t.element_size() for t in state)
    trainable = sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])
    return model + OPTIMIZER_SLOTS.get(optimizer_name, 2) * trainable


def snapshot(last: Path, step: int, keep: int) -> Path:
    """Keep `last` also as `step-<step>.pt` beside it (a hard link: no copy, and
    it stays valid when `last` is later replaced by rename), then delete all but
    the newest `keep` snapshots."""
    last = Path(last)
    target = last.with_name(f"step-{step:08d}.pt")
    tmp = last.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(last, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(last, tmp)
    os.replace(tmp, target)
    for old in sorted(last.parent.glob("step-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return target


def load(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file can fail in many ways inside the unpickler
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not an iecl checkpoint")
    if state["format"] not in READABLE_FORMATS:
        raise CheckpointError(f"{path} has checkpoint format {state['format']!r}; this iecl reads formats "
                              f"{', '.join(map(str, READABLE_FORMATS))} (a newer iecl wrote it?)")
    problem = _schema_problem(state, SCHEMA, "")
    for key, (since, kind) in ADDED_IN.items():
        if problem is None and state["format"] >= since:
            problem = _schema_problem(state, {key: kind}, "")
    if problem:
        raise CheckpointError(f"{path} is not a complete iecl checkpoint (format {state['format']}): {problem}")
    state.setdefault("bad_files", [])
    return state


def _schema_problem(value: dict, schema: dict, where: str) -> str | None:
    """The first key of `schema` missing from `value` or of the wrong type, as
    a phrase; None if it matches."""
    for key, kind in schema.items():
        name = f"{where}{key}"
        if key not in value:
            return f"{name} is missing"
        if isinstance(kind, dict):
            if not isinstance(value[key], dict):
                return f"{name} is a {type(value[key]).__name__}, not a mapping"
            problem = _schema_problem(value[key], kind, f"{name}.")
            if problem:
                return problem
        elif not isinstance(value[key], kind) or (kind is int and isinstance(value[key], bool)):
            return f"{name} is a {type(value[key]).__name__}"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""  # torch's messages run to many lines


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the partial checkpoints (`.<name>.tmp-<pid>`) of writers that died
    mid-write (a SIGKILL skips the cleanup). Call it holding the run's lock:
    then no live writer can own one. -> the files removed."""
    removed = []
    for tmp in Path(folder).glob(".*.pt.tmp-*"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                  "has_gauss": np_state[3], "cached_gaussian": np_state[4]},
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
