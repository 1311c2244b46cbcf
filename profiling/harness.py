"""A training step that can be timed stage by stage, built exactly as
`iecl pretrain` builds it (`train.loop.build` / `build_model`).

`train_step` is the body of `train.loop.pretrain`'s step with the method's
`step_on_views` opened up (SAIB forward and the view preparation as separate
calls, same order, same arguments), so that a `Laps` timeline can be marked
between stages. `tests/test_profiling.py` checks that it computes the same
losses as `Method.step_on_views`; if the loop's step changes, change this too.

Marks are CUDA events on a GPU (recorded in stream order, read after one
synchronisation at the end, so the host runs ahead exactly as in training) and
`time.perf_counter` on a CPU, where an op has finished when it returns.
Consecutive marks share their boundaries: the stages of a step add up to the
time between its first and last mark by construction, and the gap a stage
leaves on the device (waiting for data, a host synchronisation) is counted in
the stage that ends it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from iecl.kernels.view_prep import ViewPrep
from iecl.model.methods import Method
from iecl.pipeline import MEAN_255, STD_255
from iecl.train.config import Config, load_config, resolve_runtime, validate
from iecl.train.faults import NonFiniteGuard
from iecl.train.loop import DTYPES, build, build_model
from iecl.train.optim import set_lr, warmup_cosine

#: the stages of a step, in timeline order, with their table labels
STAGES = {
    "data": "data wait",
    "view_prep": "view preparation",
    "saib_fwd": "SAIB forward",
    "online_fwd": "online encoder forward",
    "target_fwd": "target encoder forward",
    "heads_loss": "heads and loss",
    "sync": "non-finite check (sync)",
    "backward": "backward (encoders, heads)",
    "saib_bwd": "SAIB backward",
    "optimizer": "optimizer",
    "momentum": "momentum update",
}


def load_resolved(config: str | None, overrides: list[str]) -> Config:
    """A config as `iecl pretrain` resolves it: validated, device and precision decided."""
    cfg = load_config(config, overrides)
    validate(cfg)
    cuda = torch.cuda.is_available()
    return resolve_runtime(cfg, cuda, cuda and torch.cuda.is_bf16_supported())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Laps:
    """One timeline of marks; `lap(stage)` closes the interval since the last
    mark and charges it to `stage`. Disabled, `lap` does nothing."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.enabled = False
        self._marks: list[tuple[str, object]] = []
        self._step_ends: list[int] = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin(self) -> None:
        self._marks, self._step_ends = [("", self._now())], []
        self.enabled = True

    def lap(self, stage: str) -> None:
        if self.enabled:
            self._marks.append((stage, self._now()))

    def end_step(self) -> None:
        if self.enabled:
            self._step_ends.append(len(self._marks) - 1)

    def finish(self) -> list[dict[str, float]]:
        """Per step, seconds per stage (stages met more than once are summed)."""
        self.enabled = False
        synchronize(self.device)
        steps, start = [], 0
        for end in self._step_ends:
            stages: dict[str, float] = {}
            for (_, a), (stage, b) in zip(self._marks[start:end], self._marks[start + 1 : end + 1]):
                seconds = a.elapsed_time(b) / 1e3 if self.cuda else b - a
                stages[stage] = stages.get(stage, 0.0) + seconds
            steps.append(stages)
            start = end
        return steps


class TimedEncoder(nn.Module):
    """Wraps an encoder so its forwards are marked as `stage`; whatever ran
    since the previous mark (heads, loss terms) is charged to `heads_loss`."""

    def __init__(self, inner: nn.Module, stage: str, laps: Laps) -> None:
        super().__init__()
        self.inner, self.stage = inner, stage
        self._laps = laps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._laps.lap("heads_loss")
        out = self.inner(x)
        self._laps.lap(self.stage)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


@dataclass
class Harness:
    cfg: Config
    device: torch.device
    method: Method
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    base_lr: float
    prepare: ViewPrep
    autocast: object
    guard: NonFiniteGuard
    laps: Laps
    loader: object = None  # None: data resident on the device
    total_steps: int = 1000

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()


def build_harness(cfg: Config, images=None) -> Harness:
    """The method, optimizer and (with `images`) loader of `iecl pretrain`."""
    device = torch.device(cfg.train.device)
    if images is not None:
        method, loader, optimizer, scaler, base_lr = build(cfg, images, device)
    else:
        torch.manual_seed(cfg.run.seed)
        method, optimizer, scaler, base_lr = build_model(cfg, device)
        loader = None
    dtype = DTYPES[cfg.train.precision]
    prepare = ViewPrep(cfg.kernels.view_prep, torch.tensor(MEAN_255, device=device),
                       torch.tensor(STD_255, device=device), dtype, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    method.train()
    return Harness(cfg, device, method, optimizer, scaler, base_lr, prepare, autocast,
                   NonFiniteGuard(cfg.train.max_nonfinite), Laps(device), loader)


def compile_and_instrument(h: Harness) -> None:
    """`train.compile` as the loop does it, then the encoders' timing wrappers
    (outside the compiled modules, so the marks cause no graph breaks)."""
    if h.cfg.train.compile:
        h.method.compile_encoders()
    for name, stage in (("online", "online_fwd"), ("target", "target_fwd")):
        inner = getattr(h.method, name, None)
        if isinstance(inner, nn.Module) and not isinstance(inner, TimedEncoder):
            setattr(h.method, name, TimedEncoder(inner, stage, h.laps))


def train_step(h: Harness, anchor_u8: torch.Tensor, query_u8: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    """One step of `train.loop.pretrain`, marked on `h.laps` when it is enabled."""
    losses, reached_saib = forward_step(h, anchor_u8, query_u8, step)
    h.optimizer.zero_grad(set_to_none=True)
    finite = h.guard.finite(losses["loss"], step)
    h.laps.lap("sync")
    if finite:
        backward_step(h, losses, reached_saib)
        update_step(h, step)
    return losses


def forward_step(h: Harness, anchor_u8: torch.Tensor, query_u8: torch.Tensor, step: int):
    """Learning rate, view preparation, SAIB and the method's losses:
    `Method.step_on_views` opened up. -> (losses, did the backward reach SAIB?)"""
    m, lap = h.method, h.laps.lap
    lr = h.base_lr * warmup_cosine(step, h.total_steps, 0, h.cfg.optim.min_lr_ratio)
    set_lr(h.optimizer, lr, h.base_lr)
    with h.autocast:
        if m.saib is not None:
            query = m.saib.forward_uint8(query_u8, h.prepare.mean, h.prepare.std, h.prepare.dtype)
            lap("saib_fwd")
            anchor = h.prepare(anchor_u8)
        else:
            anchor, query = h.prepare(anchor_u8), h.prepare(query_u8)
        lap("view_prep")
        reached_saib = _mark_saib_backward(h, query)
        losses = m.loss_on_views(anchor, query)
        lap("heads_loss")
    return losses, reached_saib


def backward_step(h: Harness, losses: dict[str, torch.Tensor], reached_saib) -> None:
    h.scaler.scale(losses["loss"]).backward()
    h.laps.lap("saib_bwd" if reached_saib() else "backward")


def update_step(h: Harness, step: int) -> None:
    h.scaler.step(h.optimizer)
    h.scaler.update()
    h.laps.lap("optimizer")
    h.method.momentum_update(step / h.total_steps)
    h.laps.lap("momentum")


def _mark_saib_backward(h: Harness, query: torch.Tensor):
    """Mark the moment the query's gradient reaches SAIB. SAIB's autograd
    nodes are the step's oldest, and the engine runs the newest ready node
    first, so everything after this mark in the backward is SAIB's own."""
    fired = [False]
    if h.method.saib is not None and query.requires_grad:
        def hook(grad):
            fired[0] = True
            h.laps.lap("backward")
        query.register_hook(hook)
    return lambda: fired[0]


def resident_views(cfg: Config, device: torch.device, count: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` pairs of random uint8 NHWC views already on the device (not
    zeros: they would hide nothing here, but random is what real data looks like)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.train.batch_size, cfg.data.image_size, cfg.data.image_size, 3)
    return [
        tuple(torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device) for _ in range(2))
        for _ in range(count)
    ]


def batches(h: Harness, views: list | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (anchor, query) uint8 views: the loader's, epoch after epoch, or
    the resident `views` in turn."""
    if h.loader is None:
        while True:
            yield from views
    epoch = 0
    while True:
        h.loader.set_epoch(epoch)
        for batch in h.loader:
            yield batch.anchor, batch.query
        epoch += 1


def run_steps(h: Harness, source: Iterator, steps: int, first_step: int = 0, laps: bool = False) -> tuple[float, list[dict]]:
    """Run `steps` steps from `source`; (wall-clock seconds, synchronised at
    both ends; per-step stage seconds when `laps`)."""
    synchronize(h.device)
    start = time.perf_counter()
    if laps:
        h.laps.begin()
    for i in range(steps):
        anchor, query = next(source)
        h.laps.lap("data")
        train_step(h, anchor, query, first_step + i)
        h.laps.end_step()
    synchronize(h.device)
    wall = time.perf_counter() - start
    return wall, (h.laps.finish() if laps else [])


def step_flop(h: Harness, anchor_u8: torch.Tensor, query_u8: torch.Tensor) -> int:
    """FLOP of one step's forward and backward (matrix products and
    convolutions, as `torch.utils.flop_counter` counts them), on the eager
    reference SAIB: the Triton kernels do the same products, but the counter
    cannot see inside them. Call before compiling."""
    from torch.utils.flop_counter import FlopCounterMode

    saib = h.method.saib
    impl = saib.impl if saib is not None else None
    if saib is not None:
        saib.impl = "reference"
    try:
        with FlopCounterMode(display=False) as counter:
            with h.autocast:
                losses = h.method.step_on_views(anchor_u8, query_u8, h.prepare)
            losses["loss"].backward()
    finally:
        if saib is not None:
            saib.impl = impl
        h.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def describe(cfg: Config) -> str:
    t, k = cfg.train, cfg.kernels
    saib = f" +SAIB ({k.saib_impl})" if cfg.saib.enabled else ""
    return (f"{cfg.method.name} {cfg.model.backbone}{saib}, batch {t.batch_size}, {cfg.data.image_size} px, "
            f"{t.precision}{', channels-last' if t.channels_last else ''}, compile {'on' if t.compile else 'off'}, "
            f"view prep {k.view_prep}")
