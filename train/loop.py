"""The pretraining loop: set up, then one step (train/step.py) per batch,
with the bookkeeping (train/bookkeeping.py) after each.

The step is the same one `iecl profile` and `iecl compare` time. Losses stay
on the device between logged rows. In one process the host does not wait for
the device within a step (a non-finite step is skipped on the device; the
guard reads the pending losses only when a stop could be due); it waits once
per logged row and at checkpoints. Under DDP the ranks agree once per step.

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

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from iecl.model.methods import Method
from iecl.pipeline import BetonFile, DataError, ImageList, build_loader
from iecl.pipeline.sampler import EpochBatchSampler
from iecl.train import checkpoint as ckpt
from iecl.train import ddp
from iecl.train.bookkeeping import Bookkeeping, Position, Summary, Training
from iecl.train.config import Config
from iecl.train.eval.monitor import knn_splits
from iecl.train.eval.splits import LabelledSplits
from iecl.train.factory import loader_spec, method_from_config
from iecl.train.faults import NonFiniteGuard, NonFiniteLoss
from iecl.train.memory import check_fits
from iecl.train.optim import build_optimizer, scaled_lr
from iecl.train.run_dir import check_run_dir
from iecl.train.signals import StopRequest
from iecl.train.step import DTYPES, Schedule, Step, autocast_for

__all__ = ["DTYPES", "Position", "Prepared", "Summary", "build", "build_model", "build_step", "planned_steps", "prepare",
           "pretrain"]


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
    loader = build_loader(images, loader_spec(cfg, device, rank, world), progress=rank == 0)  # one bar, not one a rank
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


def build_step(cfg: Config, method: Method, optimizer, scaler, base_lr: float, steps_per_epoch: int,
               device: torch.device, *, model: nn.Module | None = None, total: int | None = None,
               report: bool = True) -> Step:
    """The training step for `cfg`: `model` is what the forward goes through
    (the DDP wrapper under torchrun; the method itself by default)."""
    total = total_steps(cfg, steps_per_epoch) if total is None else total
    schedule = Schedule(base_lr, total, round(cfg.optim.warmup_epochs * steps_per_epoch), cfg.optim.min_lr_ratio)
    return Step(model if model is not None else method, method, optimizer, scaler, schedule,
                autocast_for(device, DTYPES[cfg.train.precision]), ddp.agreement(device),
                NonFiniteGuard(cfg.train.max_nonfinite, report=report), cfg.data.max_bad_images, ddp.world_size())


@dataclass
class Prepared:
    """Everything a run needs before it writes anything: built, and restored
    from the checkpoint if resuming (so a checkpoint that does not fit is
    refused before the run folder changes)."""

    device: torch.device
    world_size: int
    method: Method
    loader: object
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    base_lr: float
    pos: Position
    resumed: bool
    bad_files: list[str]  # unreadable images met before this session (from the checkpoint)


def prepare(cfg: Config, images: ImageList | BetonFile, state: dict | None = None) -> Prepared:
    """Build the run of `cfg` and restore `state` into it; a `ConfigError`
    if one step cannot fit in the device's memory, a `CheckpointError` if the
    checkpoint does not fit the configuration. Close `.loader` if the run
    does not go on to `pretrain`."""
    device, world = ddp.training_device(cfg), ddp.world_size()
    check_fits(cfg, device)
    method, loader, optimizer, scaler, base_lr = build(cfg, images, device, rank=ddp.rank(), world_size=world)
    try:
        pos = _restore(state, cfg, method, optimizer, scaler, world) if state is not None else Position()
    except BaseException:
        loader.close()
        raise
    bad = list(state.get("bad_files", [])) if state is not None else []
    return Prepared(device, world, method, loader, optimizer, scaler, base_lr, pos, state is not None, bad)


def pretrain(
    cfg: Config,
    run_dir: Path,
    images: ImageList | BetonFile,
    state: dict | None = None,
    progress: bool = True,
    knn: LabelledSplits | None = None,
    after_step=None,
    prepared: Prepared | None = None,
) -> Summary:
    """Train `cfg` into `run_dir`, continuing from checkpoint `state` if given
    (or from `prepared`, made by `prepare(cfg, images, state)`).
    `knn`: the kNN monitor's data (`train.eval.monitor.knn_splits`), found here if not given.
    `after_step(position, method, batch)`: called after every step, skipped or
    not (for tests and tools that watch training).

    Under a process group every rank calls this with the same arguments (and
    the same `state`): each trains on its shard; rank 0 alone writes the
    metrics and checkpoints into `run_dir` and shows the progress bar."""
    p = prepared if prepared is not None else prepare(cfg, images, state)
    method, loader, optimizer, scaler, device, world, pos = (p.method, p.loader, p.optimizer, p.scaler, p.device,
                                                              p.world_size, p.pos)
    try:
        knn = knn_splits(cfg, images) if knn is None else knn
        for line in ddp.from_main(lambda: check_run_dir(run_dir, ckpt.estimate_bytes(method, optimizer, cfg.optim.name),
                                                        cfg.train.keep_checkpoints)):
            if ddp.is_main():
                ddp.warn(line)
        if cfg.train.compile:
            method.compile_encoders(**cfg.train.compile_options())
        step = build_step(cfg, method, optimizer, scaler, p.base_lr, len(loader), device,
                          model=ddp.wrap(method, device), report=ddp.is_main())
        # A folder that had logs but no checkpoint (stopped before its first) starts afresh: its old rows go.
        trim = pos.step if p.resumed or (run_dir / "metrics.jsonl").exists() else None
        book = Bookkeeping(Training(cfg, images, method, optimizer, scaler, world), run_dir, loader, pos,
                           resumed=p.resumed, total=step.schedule.total_steps, steps_per_epoch=len(loader),
                           device=device, knn=knn, progress=progress, faults=step.faults, trim_logs_after=trim,
                           known_bad=p.bad_files)
    except BaseException:
        loader.close()
        raise
    stop = StopRequest()
    method.train()
    try:
        with stop.installed():
            while not book.done():
                loader.set_epoch(pos.epoch, pos.batch_in_epoch)
                for batch, error in _batches(loader):
                    batch = book.stand_in(batch)  # a rank whose loader failed still takes part in the step
                    bad_images, latest_bad = book.name_bad_images()
                    outcome = step(batch.anchor, batch.query, pos.step, signal=stop.signal, error=error,
                                   bad_images=bad_images, latest_bad=latest_bad)
                    book.advance(outcome, batch)
                    if after_step is not None:
                        after_step(pos, method, batch)
                    book.log_save_evaluate(outcome)
                    if book.done():
                        break
            book.save_if_unsaved()  # a stop signal now still finds the loop's handler: the save completes
    except (DataError, NonFiniteLoss) as err:
        if pos.step > book.last_saved:
            book.save()  # skipped steps changed no weights: these are the weights from before the fault
        raise type(err)(
            f"{err}. Progress up to step {pos.step} is in {run_dir / 'last.pt'}; "
            f"continue with: iecl pretrain --resume {run_dir}"
        ) from None
    finally:
        book.close()
        loader.close()
    return book.summary()


def _batches(loader):
    """The loader's batches as (batch, None); a `DataError` from the loader
    ends the epoch as (None, error) instead of propagating: the step raises it
    on every rank at once (under DDP the rank must still take part in the
    step's collectives and tell the others)."""
    it = iter(loader)
    try:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DataError as err:
                yield None, err
                return
            yield batch, None
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # a generator left early stops its workers now, not at garbage collection


#: Keys that size the method's tensors: a resume cannot change them.
SHAPING_KEYS = ("method.name", "model.backbone", "model.spectral_norm", "model.projector_hidden", "model.projector_out",
                "model.predictor_hidden", "method.queue_size", "train.batch_size", "data.image_size", "saib.enabled",
                "saib.patch_size")


def _refuse_changed_shapes(saved: dict, cfg: Config) -> None:
    now = cfg.to_dict()
    for key in SHAPING_KEYS:
        if key in ("train.batch_size", "saib.patch_size") and not (cfg.saib.enabled or saved["saib"].get("enabled")):
            continue  # only SAIB's weights depend on these
        section, name = key.split(".")
        old, new = saved.get(section, {}).get(name), now[section][name]
        if old is not None and old != new:
            why = " (SAIB's weights are sized by the batch)" if key == "train.batch_size" else ""
            raise ckpt.CheckpointError(
                f"this resume changes {key} from {old} to {new}, which the checkpoint's weights cannot follow{why}; "
                f"resume with {key}={old}, or start a new run"
            )


def _restore(state: dict, cfg: Config, method: Method, optimizer, scaler, world_size: int = 1) -> Position:
    made_by = state.get("world_size", 1)
    if made_by != world_size:
        raise ckpt.CheckpointError(
            f"the checkpoint was made by {made_by} rank(s) and this run has {world_size}: its position in the "
            f"epoch counts batches of {made_by} ranks and its learning rate their global batch; resume with "
            f"{made_by} process(es) in all (torchrun --nnodes x --nproc_per_node)"
        )
    _refuse_changed_shapes(state["config"], cfg)
    try:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ckpt.CheckpointError(
            f"the checkpoint does not fit this configuration (changed model, batch or image size?): {first}"
        ) from None
    scaler.load_state_dict(state["scaler"])
    ckpt.restore_rng(state["rng"])
    return Position(state["step"], state["epoch"], state["batch_in_epoch"])
