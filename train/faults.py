"""Numeric faults during training: a non-finite loss is skipped, counted, and
past a limit ends the run (with its progress saved by the loop)."""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from iecl.pipeline.errors import UserError


class NonFiniteLoss(UserError, RuntimeError):
    """Too many consecutive steps with a NaN or infinite loss."""


class NonFiniteGuard:
    """A step whose loss is not finite is skipped: no backward, no optimizer or
    momentum update (GradScaler's semantics for an overflowing fp16 step; the
    step still counts, so the schedule moves on). BatchNorm running statistics
    and MoCo's queue were updated by that step's forward and are not rolled
    back. More than `limit` in a row stop the run (`NonFiniteLoss`).

    The check reads one boolean from the device per step: a synchronisation
    the GPU barely notices at these step times (it also happens in GradScaler).
    Under DDP the ranks decide together (`train.ddp.StepAgreement`) and
    `record` counts what they decided, so every rank skips the same steps.
    """

    def __init__(self, limit: int, report: bool = True) -> None:
        self.limit = limit
        self.report = report  # warn on stderr (off on all ranks but rank 0, which speaks for all)
        self.total = 0
        self.streak = 0

    def finite(self, loss: torch.Tensor, step: int) -> bool:
        ok = bool(torch.isfinite(loss.detach()))
        return self.record(ok, step, lambda: f"loss is {loss.item()}")

    def record(self, ok: bool, step: int, what) -> bool:
        """Count step `step` (0-based) as finite or not; `what()` says what was
        wrong, for the warning. True: make the update."""
        if ok:
            self.streak = 0
            return True
        self.total += 1
        self.streak += 1
        if self.streak > self.limit:
            raise NonFiniteLoss(
                f"the loss was not finite for {self.streak} step(s) in a row (steps {step - self.streak + 2} to "
                f"{step + 1}; train.max_nonfinite={self.limit}): lower optim.lr, use train.precision=bf16 or "
                "fp32 rather than fp16, or look for broken inputs"
            )
        if self.report:
            tqdm.write(f"iecl pretrain: warning: step {step + 1}: {what()}; step skipped ({self.total} so far)",
                       sys.stderr)
        return False
