"""Numeric faults during training: a non-finite loss is skipped, counted, and
past a limit ends the run (with its progress saved by the loop)."""

from __future__ import annotations

import math
import sys

import torch
from tqdm import tqdm

from iecl.pipeline.errors import UserError


class NonFiniteLoss(UserError, RuntimeError):
    """Too many consecutive steps with a NaN or infinite loss."""


class NonFiniteGuard:
    """A step whose loss is not finite is skipped: no optimizer or momentum
    update (GradScaler's semantics for an overflowing fp16 step; the step still
    counts, so the schedule moves on). BatchNorm running statistics and MoCo's
    queue were updated by that step's forward and are not rolled back. More
    than `limit` in a row stop the run (`NonFiniteLoss`), at the step that is
    one too many.

    Two ways to count. Under DDP the ranks decide together on the host
    (`train.ddp.StepAgreement`, the step's one all-reduce) and `record` counts
    what they decided. In one process the skip is decided on the device (the
    step hands the optimizer a `found_inf` flag, as GradScaler does), and the
    step's loss is handed to `defer`: the host reads the pending losses only
    when a stop could be due (the streak plus the unread steps would pass the
    limit: every `limit + 1` steps at most) or when `total` is read (logged
    rows, the summary). So the counts, the warnings (printed at that read) and
    the step a run stops at are those of a per-step check, without its sync.
    """

    def __init__(self, limit: int, report: bool = True) -> None:
        self.limit = limit
        self.report = report  # warn on stderr (off on all ranks but rank 0, which speaks for all)
        self._total = 0
        self.streak = 0
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not read yet

    @property
    def total(self) -> int:
        """Skipped steps so far (reading it reads the pending losses: a host sync)."""
        self.settle()
        return self._total

    def defer(self, loss: torch.Tensor, step: int) -> None:
        """Count step `step` (0-based), whose update the device skips when
        `loss` is not finite, once its loss is read."""
        self._pending.append((step, loss.detach()))
        if self.streak + len(self._pending) > self.limit:
            self.settle()  # this step could be the one too many

    def settle(self) -> None:
        """Read the pending losses (one host sync) and count them in order."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = torch.stack([loss.float() for _, loss in pending]).tolist()  # host sync
        for (step, _), value in zip(pending, values):
            self.record(math.isfinite(value), step, lambda value=value: f"loss is {value}")

    def record(self, ok: bool, step: int, what) -> bool:
        """Count step `step` (0-based) as finite or not; `what()` says what was
        wrong, for the warning. True: make the update."""
        if ok:
            self.streak = 0
            return True
        self._total += 1
        self.streak += 1
        if self.streak > self.limit:
            raise NonFiniteLoss(
                f"the loss was not finite for {self.streak} step(s) in a row (steps {step - self.streak + 2} to "
                f"{step + 1}; train.max_nonfinite={self.limit}): lower optim.lr, use train.precision=bf16 or "
                "fp32 rather than fp16, or look for broken inputs"
            )
        if self.report:
            tqdm.write(f"iecl pretrain: warning: step {step + 1}: {what()}; step skipped ({self._total} so far)",
                       sys.stderr)
        return False
