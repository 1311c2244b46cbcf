"""The training step: the one `iecl pretrain` runs, and the one `iecl profile`
and `iecl compare` time.

    learning rate    warm-up + cosine schedule, set on every parameter group
    forward          the method (or its DistributedDataParallel wrapper) on the
                     loader's uint8 views, under autocast: view preparation,
                     SAIB, encoders, heads, losses
    agreement        under DDP the step's one host synchronisation: is the
                     loss finite, did any rank see a stop signal or a data
                     error (one all-reduce); in one process nothing is read:
                     the loss's finiteness stays on the device
    update           skipped on a non-finite loss; else backward through the
                     gradient scaler, optimizer step, momentum update. In one
                     process the skip is made on the device (the optimizer
                     and the momentum update get the flag, as GradScaler
                     hands it to fused optimizers), so a step makes no host
                     sync; the guard reads the losses every few steps
                     (train/faults.py). fp16 (an enabled GradScaler) and
                     apex's AdamW keep one read per step: the scaler's own
                     skip and apex's step take no device flag.

A `mark(stage)` hook is called at the stage boundaries ("heads_loss",
"sync", "backward", "optimizer", "momentum"); it does nothing in training.
Profiling passes one that records device events, and adds the boundaries
inside the forward (view preparation, SAIB, each encoder) with forward hooks
on the modules the method names, so nothing here knows about profiling.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from iecl.model.methods import Method
from iecl.pipeline import DataError
from iecl.train.faults import NonFiniteGuard
from iecl.train.optim import set_lr, skips_on_device, step_unless, warmup_cosine

#: train.precision -> the autocast (and view preparation) dtype
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Mark(Protocol):
    def __call__(self, stage: str) -> None: ...


def no_mark(stage: str) -> None:
    """Training's mark: nothing."""


@dataclass
class Verdict:
    """What the ranks agreed on after a step's forward (one rank: what it saw)."""

    nonfinite_ranks: int | torch.Tensor  # ranks whose loss is NaN or infinite (one process: a device bool)
    stop: str | None  # "SIGTERM" or "SIGINT" if any rank saw one (SIGTERM wins)
    error_ranks: int  # ranks whose loader raised a DataError
    bad_images: int  # unreadable images replaced so far, summed over the ranks


class Agreement(Protocol):
    def __call__(self, loss: torch.Tensor, signal: str | None, error: bool, bad_images: int) -> Verdict: ...


class LocalAgreement:
    """One process: the verdict is what it saw; whether the loss is finite
    stays on the device (no host sync)."""

    def __call__(self, loss: torch.Tensor, signal: str | None, error: bool, bad_images: int) -> Verdict:
        return Verdict(~torch.isfinite(loss.detach()), signal, int(error), bad_images)


@dataclass
class Schedule:
    base_lr: float
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float

    def lr(self, step: int) -> float:
        return self.base_lr * warmup_cosine(step, self.total_steps, self.warmup_steps, self.min_lr_ratio)


@dataclass
class Outcome:
    losses: dict[str, torch.Tensor]  # on the device
    embeddings: tuple[torch.Tensor, torch.Tensor]  # online embeddings of (anchor, query), detached
    lr: float
    verdict: Verdict
    finite: bool | torch.Tensor  # the update was made (one process: a device bool, read only when asked)

    @property
    def updated(self) -> bool:
        """False: a non-finite loss, the step was skipped. In one process
        reading it is a host sync: the bookkeeping asks at logged rows only."""
        return bool(self.finite)


@dataclass
class Step:
    model: nn.Module  # what the forward goes through: the method, or its DDP wrapper
    method: Method  # the method itself (momentum update)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Schedule
    autocast: Callable[[], object]  # a fresh autocast context (or a null one in fp32)
    agree: Agreement
    faults: NonFiniteGuard
    max_bad_images: int
    world_size: int = 1
    mark: Mark = no_mark

    def __call__(self, anchor_u8: torch.Tensor, query_u8: torch.Tensor, step: int, *, signal: str | None = None,
                 error: DataError | None = None, bad_images: int = 0, latest_bad: str | None = None) -> Outcome:
        """Step `step` (0-based) on one batch of views. `signal`, `error` and
        `bad_images` are this rank's (a stop request, its loader's failure, its
        count of replaced images); a data error on any rank raises here, on
        every rank, before any update."""
        losses, embeddings, lr = self.forward(anchor_u8, query_u8, step)
        verdict = self.agree(losses["loss"], signal, error is not None, bad_images)
        self.mark("sync")
        raise_data_errors(verdict, error, self.max_bad_images, step, self.world_size, latest_bad)
        if isinstance(verdict.nonfinite_ranks, torch.Tensor) and self.skips_on_device():
            finite = ~verdict.nonfinite_ranks
            self.faults.defer(losses["loss"], step)  # reads the losses only when a stop could be due
            self.backward(losses)
            self.update(step, finite)
            return Outcome(losses, embeddings, lr, verdict, finite)
        nonfinite = int(verdict.nonfinite_ranks)  # a host sync in one process (fp16, apex), already read under DDP
        updated = self.faults.record(nonfinite == 0, step, lambda: self._what_was_not_finite(losses["loss"], nonfinite))
        if updated:
            self.backward(losses)
            self.update(step)
        return Outcome(losses, embeddings, lr, verdict, updated)

    def skips_on_device(self) -> bool:
        """Whether a non-finite step can be skipped with no host sync: the
        optimizer takes a device flag, and no enabled GradScaler makes its own
        decision (it reads its flag on the host for most optimizers)."""
        return skips_on_device(self.optimizer) and not self.scaler.is_enabled()

    def forward(self, anchor_u8: torch.Tensor, query_u8: torch.Tensor, step: int):
        lr = self.schedule.lr(step)
        set_lr(self.optimizer, lr, self.schedule.base_lr)
        with self.autocast():
            losses, embeddings = self.model(anchor_u8, query_u8)
        self.mark("heads_loss")
        self.optimizer.zero_grad(set_to_none=True)
        return losses, embeddings, lr

    def backward(self, losses: dict[str, torch.Tensor]) -> None:
        self.scaler.scale(losses["loss"]).backward()  # under DDP: gradients averaged over the ranks
        self.mark("backward")

    def update(self, step: int, finite: torch.Tensor | None = None) -> None:
        """The optimizer step and the momentum update; with `finite` (a device
        bool) both are made only where it is true, decided on the device."""
        if finite is None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            step_unless(self.optimizer, (~finite).float())
        self.mark("optimizer")
        self.method.momentum_update(step / self.schedule.total_steps, finite)
        self.mark("momentum")

    def _what_was_not_finite(self, loss: torch.Tensor, nonfinite_ranks: int) -> str:
        if self.world_size == 1:
            return f"loss is {loss.item()}"
        return f"the loss is not finite on {nonfinite_ranks} of {self.world_size} rank(s)"


def raise_data_errors(verdict: Verdict, error: DataError | None, limit: int, step: int, world_size: int,
                      latest_bad: str | None = None) -> None:
    """Every rank raises at the same step (before any update), so none is left
    waiting in a collective: the rank that met the error raises its own, the
    others say where to find it."""
    if verdict.error_ranks:
        raise error or DataError(
            f"{verdict.error_ranks} other rank(s) met a data error at step {step + 1} (see their error lines)"
        )
    if verdict.bad_images > limit:
        if world_size == 1:
            raise DataError(f"{verdict.bad_images} unreadable image(s) so far, more than data.max_bad_images={limit}; "
                            f"the latest: {latest_bad}; list them all with: iecl validate DATA_DIR")
        raise DataError(
            f"{verdict.bad_images} unreadable image(s) so far over all ranks, more than data.max_bad_images={limit} "
            "(each named above by the rank that met it); list them all with: iecl validate DATA_DIR"
        )


def autocast_for(device: torch.device, dtype: torch.dtype) -> Callable[[], object]:
    """A factory of autocast contexts for `dtype` (none in fp32)."""
    if dtype == torch.float32:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)
