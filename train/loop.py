"""The pretraining loop.

One step, under autocast: the method's `step_on_views` on the loader's uint8
views, which prepares them (normalise, cast, channels-last; IE-CL fuses the
query's preparation into SAIB) and computes the losses; backward through the gradient scaler (active
for fp16 only), the optimizer step, the momentum update. Losses stay on the
device between log steps, so the GPU is synchronised only when a row is logged
(every `train.log_every` steps) and when the run's throughput is measured.

A run is resumable at every step boundary: the checkpoint holds the step, the
position in the epoch, the method (online, target, SAIB), optimizer, scaler
and RNG states; the loader recomputes the epoch's order from (seed, epoch) and
skips the batches already done.

Under torchrun (train/ddp.py) every rank runs this same loop on its own shard
of each epoch (the same number of batches on every rank, so a position means
the same everywhere), through DistributedDataParallel; the ranks agree once per
step on what only one of them may know (a non-finite loss, a stop signal, a
data error), and only rank 0 writes files or prints.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from iecl.kernels.view_prep import ViewPrep
from iecl.model.methods import Method
from iecl.pipeline import (
    MEAN_255,
    STD_255,
    BetonFile,
    DataError,
    ImageList,
    build_loader,
)
from iecl.pipeline.sampler import EpochBatchSampler
from iecl.pipeline.views import ViewBatch
from iecl.train import checkpoint as ckpt
from iecl.train import ddp
from iecl.train.config import Config
from iecl.train.eval_data import LabelledSplits
from iecl.train.factory import method_from_config
from iecl.train.faults import NonFiniteGuard, NonFiniteLoss
from iecl.train.metrics import MetricsLog
from iecl.train.monitor import KnnMonitor, knn_splits, step_diagnostics
from iecl.train.optim import build_optimizer, scaled_lr, set_lr, warmup_cosine
from iecl.train.run_dir import RunDirError, check_run_dir

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def build_model(cfg: Config, device: torch.device, *, world_size: int | None = None):
    """The method, optimizer and gradient scaler for `cfg` (before any resume).
    `world_size` (default: the process group's, 1 without one) makes the global
    batch that scales the learning rate, and turns `train.sync_bn` on."""
    if device.type == "cuda":
        # Every step has the same shapes: let cuDNN time its convolution algorithms once.
        torch.backends.cudnn.benchmark = True
    world = ddp.world_size() if world_size is None else world_size
    method = method_from_config(cfg).to(device)
    if cfg.train.sync_bn and world > 1:
        ddp.convert_sync_batchnorm(method)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    base_lr = scaled_lr(cfg.optim, cfg.train.batch_size * world)
    optimizer = build_optimizer(method.param_groups(cfg.optim.weight_decay), cfg.optim, base_lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    return method, optimizer, scaler, base_lr


def build(cfg: Config, images: ImageList | BetonFile, device: torch.device, *,
          rank: int | None = None, world_size: int | None = None):
    """The method, loader, optimizer and scaler for `cfg` (before any resume).
    `rank`, `world_size` (default: the process group's): the loader's shard."""
    torch.manual_seed(cfg.run.seed)
    rank = ddp.rank() if rank is None else rank
    world = ddp.world_size() if world_size is None else world_size
    d = cfg.data
    loader = build_loader(
        d.backend,
        images,
        batch_size=cfg.train.batch_size,
        image_size=d.image_size,
        recipe=d.recipe,
        crop_scale=d.crop_scale,
        seed=cfg.run.seed,
        workers=d.workers,
        device=device,
        rank=rank,
        world_size=world,
        decode=d.decode,
    )
    method, optimizer, scaler, base_lr = build_model(cfg, device, world_size=world)
    return method, loader, optimizer, scaler, base_lr


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    steps = steps_per_epoch * cfg.train.epochs
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def planned_steps(cfg: Config, num_images: int, world_size: int = 1) -> int:
    """The run's length in steps; a `DataError` if the images cannot fill one
    batch on every rank. Every loader backend yields the sampler's number of
    full batches per epoch."""
    return total_steps(cfg, len(EpochBatchSampler(num_images, cfg.train.batch_size, cfg.run.seed, 0, world_size)))


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (and save);
    a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextmanager
    def installed(self):
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in previous:
                signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def pretrain(
    cfg: Config,
    run_dir: Path,
    images: ImageList | BetonFile,
    state: dict | None = None,
    progress: bool = True,
    knn: LabelledSplits | None = None,
    after_step=None,
) -> Summary:
    """Train `cfg` into `run_dir`, continuing from checkpoint `state` if given.
    `knn`: the kNN monitor's data (`train.monitor.knn_splits`), found here if not given.
    `after_step(position, method, batch)`: called after every step, skipped or
    not (for tests and tools that watch training).

    Under a process group every rank calls this with the same arguments (and
    the same `state`): each trains on its shard; rank 0 alone writes the
    metrics and checkpoints into `run_dir` and shows the progress bar."""
    device = ddp.training_device(cfg)
    distributed, world, main = ddp.initialized(), ddp.world_size(), ddp.is_main()
    if knn is None:
        knn = knn_splits(cfg, images)
    method, loader, optimizer, scaler, base_lr = build(cfg, images, device, rank=ddp.rank(), world_size=world)
    pos = Position()
    if state is not None:
        pos = _restore(state, method, optimizer, scaler, world)
    size = ckpt.estimate_bytes(method, optimizer, cfg.optim.name)
    for line in ddp.from_main(lambda: check_run_dir(run_dir, size, cfg.train.keep_checkpoints)):
        if main:
            ddp.warn(line)
    if cfg.train.compile:
        method.compile_encoders()
    model = ddp.wrap(method, device)  # what the step calls; `method` for everything else
    steps_per_epoch = len(loader)
    total = total_steps(cfg, steps_per_epoch)
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    global_batch = cfg.train.batch_size * world

    dtype = DTYPES[cfg.train.precision]
    mean = torch.tensor(MEAN_255, device=device)
    std = torch.tensor(STD_255, device=device)
    prepare = ViewPrep(cfg.kernels.view_prep, mean, std, dtype, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    monitor = KnnMonitor(cfg, knn, device, dtype if dtype != torch.float32 else None)

    metrics = MetricsLog(run_dir, resume_step=pos.step if state is not None else None) if main else _NoMetrics()
    bar = tqdm(total=total, initial=pos.step, unit="step", disable=not (progress and main), dynamic_ncols=True,
               mininterval=0.5)
    window = _Window(global_batch, device)
    throughput = _Throughput(pos.step, global_batch, device)
    stop = StopRequest()
    bad = _BadImages(loader, cfg.data.max_bad_images)
    faults = NonFiniteGuard(cfg.train.max_nonfinite, report=main)
    agree = ddp.StepAgreement(device) if distributed else None
    agreed_stop: str | None = None  # under DDP, the only stop signal any rank acts on
    bad_images = 0  # unreadable images replaced so far (over all ranks)
    last_batch: ViewBatch | None = None
    last_saved = pos.step if state is not None else -1
    row: dict = {}

    def stopping() -> str | None:
        return agreed_stop if distributed else stop.signal

    def save(periodic: bool = False) -> None:
        nonlocal last_saved
        if main:
            _save(cfg, images, pos, method, optimizer, scaler, run_dir, world, last_saved, periodic)
        last_saved = pos.step

    method.train()
    try:
        with stop.installed():
            while pos.step < total and stopping() is None:
                loader.set_epoch(pos.epoch, pos.batch_in_epoch)
                for batch, error in _batches(loader, catch=distributed):
                    if distributed:
                        bad.report()  # the limit is checked on the count over all ranks, below
                        if batch is None:  # this rank's loader failed: it still takes part in the step
                            batch = last_batch if last_batch is not None else _placeholder(cfg, device)
                    else:
                        bad.check()  # before training on a batch with replaced images
                    lr = base_lr * warmup_cosine(pos.step, total, warmup, cfg.optim.min_lr_ratio)
                    set_lr(optimizer, lr, base_lr)
                    with autocast:
                        losses = model(batch.anchor, batch.query, prepare)
                    optimizer.zero_grad(set_to_none=True)
                    if distributed:
                        verdict = agree(losses["loss"], stop.signal, error is not None, len(loader.bad_files))
                        agreed_stop, bad_images = verdict.stop, verdict.bad_images
                        _raise_agreed_errors(verdict, error, cfg.data.max_bad_images, pos.step)
                        finite = faults.record(verdict.nonfinite_ranks == 0, pos.step, lambda v=verdict: (
                            f"the loss is not finite on {v.nonfinite_ranks} of {world} rank(s)"))
                    else:
                        finite = faults.finite(losses["loss"], pos.step)
                        bad_images = bad.seen
                    if finite:
                        scaler.scale(losses["loss"]).backward()  # under DDP: averaged over the ranks
                        scaler.step(optimizer)
                        scaler.update()
                        method.momentum_update(pos.step / total)
                        window.add(losses)
                    last_batch = batch
                    pos.step += 1
                    pos.batch_in_epoch += 1
                    if pos.batch_in_epoch == steps_per_epoch:  # the epoch's last batch
                        pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
                    bar.update()
                    throughput.step_done(pos.step)
                    if after_step is not None:
                        after_step(pos, method, batch)
                    # A window of only skipped steps has no losses to log.
                    if (pos.step % cfg.train.log_every == 0 or pos.step == total) and window.steps:
                        row = window.flush(pos, steps_per_epoch, lr)  # under DDP: means over the ranks
                        row["bad_images"] = bad_images
                        row["skipped_steps"] = faults.total
                        if main:
                            if cfg.eval.diagnostics and faults.streak == 0:  # embeddings of a finite step
                                row.update(step_diagnostics(method, losses, cfg.train.batch_size))
                            metrics.log(row)
                            bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['img_per_s']:.0f}",
                                            lr=f"{lr:.2e}")
                    if cfg.train.checkpoint_every and pos.step % cfg.train.checkpoint_every == 0:
                        save(periodic=True)
                    if monitor.due(pos.epoch, pos.batch_in_epoch, pos.step, total):
                        if main:
                            _log_knn(monitor, method, metrics, pos, steps_per_epoch)
                        ddp.barrier()  # the other ranks wait while rank 0 evaluates
                    if pos.step >= total or stopping() is not None:
                        break
        if last_saved != pos.step:
            save()
    except (DataError, NonFiniteLoss) as err:
        if pos.step > last_saved:
            save()  # skipped steps changed no weights: these are the weights from before the fault
        raise type(err)(
            f"{err}. Progress up to step {pos.step} is in {run_dir / 'last.pt'}; "
            f"continue with: iecl pretrain --resume {run_dir}"
        ) from None
    finally:
        bar.close()
        metrics.close()
        loader.close()
    return Summary(
        run_dir=str(run_dir),
        steps=pos.step,
        steps_this_session=throughput.steps,
        epochs=pos.epoch + pos.batch_in_epoch / steps_per_epoch,
        seconds=throughput.elapsed(),
        img_per_s=throughput.img_per_s(),
        final=row,
        stopped_by=stopping() or "done",
        bad_images=bad_images,
        skipped_steps=faults.total,
        losses=window.last_losses,
        knn=monitor.last,
    )


def _batches(loader, catch: bool):
    """The loader's batches as (batch, None). With `catch`, a `DataError` from
    the loader ends the epoch as (None, error) instead of propagating: under DDP
    the rank must still take part in the step's collectives and tell the others."""
    it = iter(loader)
    try:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DataError as err:
                if not catch:
                    raise
                yield None, err
                return
            yield batch, None
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # a generator left early stops its workers now, not at garbage collection


def _placeholder(cfg: Config, device: torch.device) -> ViewBatch:
    """Views of the right shape for a rank whose loader failed before its first
    batch: its forward only keeps the collectives in step, the update is skipped."""
    views = torch.zeros(cfg.train.batch_size, cfg.data.image_size, cfg.data.image_size, 3, dtype=torch.uint8,
                        device=device)
    return ViewBatch(views, views.clone(), torch.zeros(cfg.train.batch_size, dtype=torch.int64, device=device))


def _raise_agreed_errors(verdict: ddp.Verdict, error: DataError | None, limit: int, step: int) -> None:
    """Every rank raises at the same step (before any update), so none is left
    waiting in a collective: the rank that met the error raises its own, the
    others say where to find it."""
    if verdict.error_ranks:
        raise error or DataError(
            f"{verdict.error_ranks} other rank(s) met a data error at step {step + 1} (see their error lines)"
        )
    if verdict.bad_images > limit:
        raise DataError(
            f"{verdict.bad_images} unreadable image(s) so far over all ranks, more than data.max_bad_images={limit} "
            "(each named above by the rank that met it); list them all with: iecl validate DATA_DIR"
        )


def _save(cfg: Config, images, pos: Position, method: Method, optimizer, scaler, run_dir: Path, world: int,
          last_saved: int, periodic: bool) -> None:
    path = run_dir / "last.pt"
    try:
        ckpt.save_atomic(_state(cfg, images, pos, method, optimizer, scaler, world), path)
        if periodic and cfg.train.keep_checkpoints:
            ckpt.snapshot(path, pos.step, cfg.train.keep_checkpoints)
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


def _log_knn(monitor: KnnMonitor, method: Method, metrics: MetricsLog, pos: Position, steps_per_epoch: int) -> None:
    result = monitor.run(method)  # the backbone goes back to training mode afterwards
    metrics.log({"step": pos.step, "epoch": round(pos.epoch + pos.batch_in_epoch / steps_per_epoch, 4),
                 **result, "time": time.time()})
    tqdm.write(f"iecl pretrain: step {pos.step}: kNN top-1 {100 * result['knn_top1']:.2f}%"
               + (f", top-5 {100 * result['knn_top5']:.2f}%" if "knn_top5" in result else "")
               + f" ({result['knn_seconds']:.1f} s)")


class _BadImages:
    """Reports each unreadable image the loader replaced, once, and stops the
    run (as a `DataError`, so progress is saved) past `limit` of them."""

    def __init__(self, loader, limit: int) -> None:
        self.loader, self.limit = loader, limit
        self.seen = 0

    def check(self) -> None:
        found = self.loader.bad_files
        if len(found) > self.limit and len(found) != self.seen:
            raise DataError(
                f"{len(found)} unreadable image(s) so far, more than data.max_bad_images={self.limit}; "
                f"the latest: {found[-1]}; "
                "list them all with: iecl validate DATA_DIR"
            )
        self.report()

    def report(self) -> None:
        """Name the images replaced since the last call (this rank's: only it knows them)."""
        found = self.loader.bad_files
        for name in found[self.seen :]:
            tqdm.write(f"{ddp.log_prefix()}warning: unreadable image {name} replaced by the next readable one",
                       sys.stderr)
        self.seen = len(found)


class _Window:
    """Losses summed on the device between log steps (no per-step sync)."""

    def __init__(self, batch_size: int, device: torch.device) -> None:
        self.batch_size, self.device = batch_size, device
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.start = time.perf_counter()
        self.last_losses: dict[str, float] | None = None

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1

    def flush(self, pos: Position, steps_per_epoch: int, lr: float) -> dict:
        means = ddp.all_reduce_mean(torch.stack(list(self.sums.values())).div_(self.steps)).tolist()  # the one sync
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
            torch.cuda.synchronize(self.device)

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


def _state(cfg: Config, images: ImageList | BetonFile, pos: Position, method: Method, optimizer, scaler,
           world_size: int = 1) -> dict:
    return {
        "format": ckpt.FORMAT,
        "step": pos.step,
        "epoch": pos.epoch,
        "batch_in_epoch": pos.batch_in_epoch,
        "world_size": world_size,  # the epoch position counts batches of this many ranks
        "method": method.state_dict(),  # the unwrapped method: no DDP "module." prefixes
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": ckpt.rng_state(),
        "config": cfg.to_dict(),
        "dataset": {"root": images.root, "images": len(images)},
    }


def _restore(state: dict, method: Method, optimizer, scaler, world_size: int = 1) -> Position:
    made_by = state.get("world_size", 1)
    if made_by != world_size:
        raise ckpt.CheckpointError(
            f"the checkpoint was made by {made_by} rank(s) and this run has {world_size}: its position in the "
            f"epoch counts batches of {made_by} ranks and its learning rate their global batch; resume with "
            f"{made_by} process(es) in all (torchrun --nnodes x --nproc_per_node)"
        )
    try:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ckpt.CheckpointError(
            f"the checkpoint does not fit this configuration (changed model, batch or image size?): {err}"
        ) from None
    scaler.load_state_dict(state["scaler"])
    ckpt.restore_rng(state["rng"])
    return Position(state["step"], state["epoch"], state["batch_in_epoch"])
