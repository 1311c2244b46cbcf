"""Everything the loop keeps track of besides the step itself: the position
in the run, the losses of the current logging window, throughput, the
unreadable images, the progress bar, the metrics log, checkpoint cadence
and the kNN monitor. `Bookkeeping.after_step` is the loop's one call after a
step; it decides what is logged, saved or evaluated there.

Host synchronisations made here: the logging window's one all-reduce/read
per logged row (`_Window.flush`), and the throughput clock's two (after the
first steps and at the end). The step's own is in train/step.py.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from iecl.model.methods import Method
from iecl.pipeline import BetonFile, ImageList
from iecl.pipeline.views import ViewBatch
from iecl.train import checkpoint as ckpt
from iecl.train import ddp
from iecl.train.config import Config
from iecl.train.eval.monitor import KnnMonitor, step_diagnostics
from iecl.train.eval.splits import LabelledSplits
from iecl.train.metrics import MetricsLog
from iecl.train.run_dir import RunDirError
from iecl.train.step import DTYPES, Outcome


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` done


@dataclass
class Summary:
    run_dir: str
    steps: int  # total steps done, including before a resume
    steps_this_session: int
    epochs: float
    seconds: float
    img_per_s: float  # steady state: after the first `warmup_steps` of this session
    final: dict  # last logged row
    stopped_by: str  # "done", "SIGINT" or "SIGTERM"
    bad_images: int = 0  # unreadable images met and replaced this session
    skipped_steps: int = 0  # steps skipped for a non-finite loss this session
    losses: dict | None = None  # the method's losses in the last logged row
    knn: dict | None = None  # the last kNN monitor result


@dataclass
class Training:
    """What a checkpoint holds besides the position."""

    cfg: Config
    images: ImageList | BetonFile
    method: Method
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    world_size: int


class Bookkeeping:
    def __init__(self, t: Training, run_dir: Path, loader, pos: Position, *, resumed: bool, total: int,
                 steps_per_epoch: int, device: torch.device, knn: LabelledSplits | None, progress: bool,
                 faults, trim_logs_after: int | None = None, known_bad: list[str] = ()) -> None:
        """`trim_logs_after`: a step; metrics rows after it are dropped (a resume
        from it; default: the position if `resumed`). `known_bad`: the unreadable
        images of earlier sessions (the checkpoint's `bad_files`)."""
        cfg, main = t.cfg, ddp.is_main()
        self.t, self.run_dir, self.loader, self.pos = t, run_dir, loader, pos
        self.total, self.steps_per_epoch, self.main = total, steps_per_epoch, main
        self.faults = faults
        global_batch = cfg.train.batch_size * t.world_size
        if trim_logs_after is None and resumed:
            trim_logs_after = pos.step
        self.metrics = (MetricsLog(run_dir, resume_step=trim_logs_after,
                                   wandb=cfg.log if cfg.log.wandb else None, config=cfg.to_dict())
                        if main else _NoMetrics())
        self.bar = tqdm(total=total, initial=pos.step, unit="step", disable=not (progress and main),
                        dynamic_ncols=True, mininterval=0.5)
        self.window = _Window(global_batch, device)
        self.throughput = _Throughput(pos.step, global_batch, device)
        self.monitor = KnnMonitor(cfg, knn, device, _eval_dtype(cfg))
        self.bad = BadFiles(known_bad, main)
        self.bad_images = 0  # over all ranks, as last agreed
        self.stop: str | None = None  # the stop signal the ranks agreed on
        self.last_saved = pos.step if resumed else -1
        self.last_batch: ViewBatch | None = None
        self.row: dict = {}

    # ------------------------------------------------------------- before a step

    def done(self) -> bool:
        return self.pos.step >= self.total or self.stop is not None

    def name_bad_images(self) -> tuple[int, str | None]:
        """Name this rank's newly met unreadable images, once each ->
        (this rank's share of the run's count so far, the latest)."""
        new = self.bad.update(self.loader.bad_files)
        count = self.bad.count()
        if self.t.world_size == 1 and count > self.t.cfg.data.max_bad_images:
            return count, self.bad.latest  # the step stops the run with one error line naming the latest
        for name in new:
            tqdm.write(f"{ddp.log_prefix()}warning: unreadable image {name} replaced by the next readable one",
                       sys.stderr)
        return count, self.bad.latest

    def stand_in(self, batch: ViewBatch | None) -> ViewBatch:
        """`batch`, or for a rank whose loader failed, views of the right shape:
        its forward only keeps the collectives in step; the update is skipped."""
        if batch is not None:
            return batch
        if self.last_batch is not None:
            return self.last_batch
        cfg = self.t.cfg
        views = torch.zeros(cfg.train.batch_size, cfg.data.image_size, cfg.data.image_size, 3, dtype=torch.uint8,
                            device=self.window.device)
        return ViewBatch(views, views.clone(), torch.zeros(cfg.train.batch_size, dtype=torch.int64,
                                                           device=self.window.device))

    # ------------------------------------------------------------- after a step

    def advance(self, outcome: Outcome, batch: ViewBatch) -> None:
        """Count the step: position, losses of the window, bar, throughput."""
        pos = self.pos
        self.stop, self.bad_images = outcome.verdict.stop, outcome.verdict.bad_images
        self.window.add(outcome.losses, outcome.finite)  # a skipped step adds nothing (decided on the device)
        self.last_batch = batch
        pos.step += 1
        pos.batch_in_epoch += 1
        if pos.batch_in_epoch == self.steps_per_epoch:  # the epoch's last batch
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
        self.bar.update()
        self.throughput.step_done(pos.step)

    def log_save_evaluate(self, outcome: Outcome) -> None:
        """What is due at this step: a metrics row, a checkpoint, the kNN monitor."""
        cfg, pos = self.t.cfg, self.pos
        # A window of only skipped steps has no losses to log.
        if (pos.step % cfg.train.log_every == 0 or pos.step == self.total) and self.window.has_losses():
            self._log(outcome)
        if cfg.train.checkpoint_every and pos.step % cfg.train.checkpoint_every == 0:
            self.save(periodic=True)
        if self.monitor.due(pos.epoch, pos.batch_in_epoch, pos.step, self.total):
            if self.main:
                self._log_knn()
            ddp.barrier()  # the other ranks wait while rank 0 evaluates

    def _log(self, outcome: Outcome) -> None:
        cfg = self.t.cfg
        row = self.window.flush(self.pos, self.steps_per_epoch, outcome.lr)  # host sync; means over the ranks
        row["bad_images"] = self.bad_images
        row["skipped_steps"] = self.faults.total
        if self.main:
            if cfg.eval.diagnostics and outcome.updated:  # embeddings of a finite step
                row.update(step_diagnostics(self.t.method, outcome.losses, outcome.embeddings, cfg.train.batch_size))
            self.metrics.log(row)
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['img_per_s']:.0f}", lr=f"{outcome.lr:.2e}")
        self.row = row

    def _log_knn(self) -> None:
        pos = self.pos
        result = self.monitor.run(self.t.method)  # the backbone goes back to training mode afterwards
        self.metrics.log({"step": pos.step, "epoch": round(pos.epoch + pos.batch_in_epoch / self.steps_per_epoch, 4),
                          **result, "time": time.time()})
        tqdm.write(f"iecl pretrain: step {pos.step}: kNN top-1 {100 * result['knn_top1']:.2f}%"
                   + (f", top-5 {100 * result['knn_top5']:.2f}%" if "knn_top5" in result else "")
                   + f" ({result['knn_seconds']:.1f} s)")

    # ------------------------------------------------------------- checkpoints

    def save(self, periodic: bool = False) -> None:
        """last.pt (rank 0), and with train.keep_checkpoints a snapshot on periodic saves."""
        bad_files = self.bad.merge_ranks()  # every rank takes part
        if self.main:
            _save(self.t, self.pos, self.run_dir, self.last_saved, periodic, bad_files)
        self.last_saved = self.pos.step

    def save_if_unsaved(self) -> None:
        if self.last_saved != self.pos.step:
            self.save()

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()

    def summary(self) -> Summary:
        pos = self.pos
        return Summary(
            run_dir=str(self.run_dir), steps=pos.step, steps_this_session=self.throughput.steps,
            epochs=pos.epoch + pos.batch_in_epoch / self.steps_per_epoch, seconds=self.throughput.elapsed(),
            img_per_s=self.throughput.img_per_s(), final=self.row, stopped_by=self.stop or "done",
            bad_images=self.bad_images, skipped_steps=self.faults.total, losses=self.window.last_losses,
            knn=self.monitor.last,
        )


def _eval_dtype(cfg: Config):
    dtype = DTYPES[cfg.train.precision]
    return dtype if dtype != torch.float32 else None


class BadFiles:
    """The run's unreadable images, each file counted once however often it is
    met (every epoch, on any rank, before or after a resume).

    Loaders name each file once, as the same "path (reason)" string in every
    backend (pipeline/bad_files.py), so the string identifies the file.
    `known` are the run's files as of the last checkpoint (the same on every
    rank); `new` this rank's since. Each rank reports `count()` to the step's
    agreement, which sums them: rank 0 adds `known`, every rank its `new`. A
    file first met on two ranks in the same stretch counts twice until the
    next checkpoint merges the ranks' sets."""

    def __init__(self, known: list[str], main: bool) -> None:
        self.known, self.new = set(known), set()
        self.main = main
        self.seen = 0  # entries of the loader's list already read
        self.latest: str | None = None

    def update(self, found: list[str]) -> list[str]:
        """Read the loader's list -> the entries of files not met before."""
        if len(found) < self.seen:  # a loader that started its list again
            self.seen = 0
        fresh = [name for name in found[self.seen:] if name not in self.known and name not in self.new]
        self.new.update(fresh)
        if len(found) > self.seen:
            self.latest = found[-1]
        self.seen = len(found)
        return fresh

    def count(self) -> int:
        return len(self.new) + (len(self.known) if self.main else 0)

    def merge_ranks(self) -> list[str]:
        """All ranks' files in one sorted list (a collective under a process
        group); they become the `known` of every rank."""
        merged = ddp.union_over_ranks([*self.known, *self.new])
        self.known, self.new = set(merged), set()
        return merged


def checkpoint_state(t: Training, pos: Position, bad_files: list[str] = ()) -> dict:
    return {
        "format": ckpt.FORMAT,
        "step": pos.step,
        "epoch": pos.epoch,
        "batch_in_epoch": pos.batch_in_epoch,
        "world_size": t.world_size,  # the epoch position counts batches of this many ranks
        "method": t.method.state_dict(),  # the unwrapped method: no DDP "module." prefixes
        "optimizer": t.optimizer.state_dict(),
        "scaler": t.scaler.state_dict(),
        "rng": ckpt.rng_state(),
        "config": t.cfg.to_dict(),
        "dataset": {"root": t.images.root, "images": len(t.images)},
        "bad_files": list(bad_files),  # the run's unreadable images so far (BadFiles)
    }


def _save(t: Training, pos: Position, run_dir: Path, last_saved: int, periodic: bool, bad_files: list[str]) -> None:
    path = run_dir / "last.pt"
    try:
        ckpt.save_atomic(checkpoint_state(t, pos, bad_files), path)
        if periodic and t.cfg.train.keep_checkpoints:
            ckpt.snapshot(path, pos.step, t.cfg.train.keep_checkpoints)
    except OSError as err:
        kept = f"{path} still holds step {last_saved}" if last_saved >= 0 else "no checkpoint was written"
        raise RunDirError(f"cannot write the checkpoint of step {pos.step} to {run_dir}: {err.strerror or err}; "
                          f"{kept}: free space (or fix the folder) and continue with --resume {run_dir}") from None


class _NoMetrics:
    """What ranks other than 0 log to."""

    def log(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _Window:
    """Losses summed on the device between log steps (no per-step sync)."""

    def __init__(self, batch_size: int, device: torch.device) -> None:
        self.batch_size, self.device = batch_size, device
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.start = time.perf_counter()
        self.last_losses: dict[str, float] | None = None

    def add(self, losses: dict[str, torch.Tensor], finite: bool | torch.Tensor = True) -> None:
        """`finite`: the step was made (one process: a device bool, masked in with no host read)."""
        if finite is False:
            return
        for key, value in losses.items():
            value = value.detach().float()
            if isinstance(finite, torch.Tensor):
                value = torch.where(finite, value, 0.0)  # a select: NaN * 0 is NaN
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps = self.steps + (finite.int() if isinstance(finite, torch.Tensor) else 1)

    def has_losses(self) -> bool:
        """Any finite step in the window (a host sync where the count is on the device)."""
        return bool(self.steps)

    def flush(self, pos: Position, steps_per_epoch: int, lr: float) -> dict:
        self.steps = int(self.steps)  # host sync (with the next line's)
        means = ddp.all_reduce_mean(torch.stack(list(self.sums.values())).div_(self.steps)).tolist()  # host sync
        values = dict(zip(self.sums, means))
        self.last_losses = values
        now = time.perf_counter()
        row = {
            "step": pos.step,
            "epoch": round(pos.epoch + pos.batch_in_epoch / steps_per_epoch, 4),
            **values,
            "lr": lr,
            "img_per_s": self.steps * self.batch_size / (now - self.start),
            "time": time.time(),
        }
        if not all(math.isfinite(v) for v in values.values()):
            row["nonfinite"] = True
        self.sums, self.steps, self.start = {}, 0, now
        return row


class _Throughput:
    """Images/s of this session, excluding the first steps (allocator warm-up,
    cuDNN autotuning, compilation), with the device synchronised at both ends."""

    def __init__(self, start_step: int, batch_size: int, device: torch.device, warmup_steps: int = 3) -> None:
        self.start_step, self.batch_size, self.device = start_step, batch_size, device
        self.warmup_steps = warmup_steps
        self.t_begin = time.perf_counter()
        self.t_warm: float | None = None  # clock when `warmup_steps` were done
        self.steps = 0
        self.t_end = self.t_begin

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host sync: the clock reads finished work

    def step_done(self, step: int) -> None:
        self.steps = step - self.start_step
        if self.steps == self.warmup_steps:
            self._sync()
            self.t_warm = time.perf_counter()
        self.t_end = time.perf_counter()

    def elapsed(self) -> float:
        self._sync()
        self.t_end = time.perf_counter()
        return self.t_end - self.t_begin

    def img_per_s(self) -> float:
        if self.t_warm is not None and self.steps > self.warmup_steps:
            return (self.steps - self.warmup_steps) * self.batch_size / (self.t_end - self.t_warm)
        span = self.t_end - self.t_begin
        return self.steps * self.batch_size / span if span > 0 and self.steps else 0.0
