"""The training step of `iecl pretrain` (train/step.py), built as the loop
builds it (`train.loop.build` / `build_model` / `build_step`), and timed
stage by stage without a copy of it.

Marks are CUDA events on a GPU (recorded in stream order, read after one
synchronisation at the end, so the host runs ahead exactly as in training) and
`time.perf_counter` on a CPU, where an op has finished when it returns.
Consecutive marks share their boundaries: the stages of a step add up to the
time between its first and last mark by construction, and the gap a stage
leaves on the device (waiting for data, a host synchronisation) is counted in
the stage that ends it. The marks come from:

- the step itself (`Step.mark`): "heads_loss" after the forward, "sync" after
  the agreement, "backward", "optimizer", "momentum";
- forward hooks added here on the modules the method has: after its view
  preparation ("view_prep") and SAIB ("saib_fwd"), before each encoder it
  names in `Method.encoders()` ("heads_loss": what ran since the last mark)
  and after it ("online_fwd", "target_fwd");
- a gradient hook on SAIB's output: SAIB's autograd nodes are the step's
  oldest, and the engine runs the newest ready node first, so what the
  backward does after the gradient reaches SAIB is SAIB's own ("saib_bwd");
- the caller, "data", when a batch has arrived.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from iecl.model.methods import Method
from iecl.train.config import Config, load_config, resolve_runtime, validate
from iecl.train.loop import build, build_model, build_step
from iecl.train.step import Step

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
        self._in_saib = False

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin(self) -> None:
        self._marks, self._step_ends = [("", self._now())], []
        self._in_saib = False
        self.enabled = True

    def lap(self, stage: str) -> None:
        if self.enabled:
            if stage == "backward" and self._in_saib:  # the step's mark after backward() returned
                stage, self._in_saib = "saib_bwd", False
            self._marks.append((stage, self._now()))

    def saib_reached(self, grad: torch.Tensor) -> None:
        """A gradient hook on SAIB's output: the encoders' backward is done.
        Only while marking: a flag left set by an unmarked step (a warm-up)
        would charge the next marked step's whole backward to SAIB."""
        if self.enabled:
            self.lap("backward")
            self._in_saib = True

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


@dataclass
class Harness:
    cfg: Config
    device: torch.device
    method: Method
    step: Step
    laps: Laps
    loader: object = None  # None: data resident on the device

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()


def build_harness(cfg: Config, images=None, total_steps: int = 1000) -> Harness:
    """The method, optimizer, step and (with `images`) loader of `iecl pretrain`,
    marked on the harness's `laps`. `total_steps` sets the schedule's length
    (a profile stays near its start). Not compiled yet: see `compile_if_configured`."""
    device = torch.device(cfg.train.device)
    if images is not None:
        method, loader, optimizer, scaler, base_lr = build(cfg, images, device, rank=0, world_size=1)
    else:
        torch.manual_seed(cfg.run.seed)
        method, optimizer, scaler, base_lr = build_model(cfg, device, world_size=1)
        loader = None
    laps = Laps(device)
    steps_per_epoch = len(loader) if loader is not None else total_steps
    step = build_step(cfg, method, optimizer, scaler, base_lr, steps_per_epoch, device, total=total_steps)
    step.mark = laps.lap
    instrument(method, laps)
    method.train()
    return Harness(cfg, device, method, step, laps, loader)


def instrument(method: Method, laps: Laps) -> None:
    """The forward hooks of the module docstring."""
    method.prepare.register_forward_hook(lambda *_: laps.lap("view_prep"))
    if method.saib is not None:
        def after_saib(module, args, out):
            laps.lap("saib_fwd")
            if out.requires_grad:
                out.register_hook(laps.saib_reached)
        method.saib.register_forward_hook(after_saib)
    for role, encoder in method.encoders().items():
        encoder.register_forward_pre_hook(lambda *_: laps.lap("heads_loss"))
        encoder.register_forward_hook(lambda *_, stage=f"{role}_fwd": laps.lap(stage))


def compile_if_configured(h: Harness) -> None:
    """`train.compile` as the loop does it (the encoders' parts; the hooked
    encoder modules stay eager, so the marks cause no graph breaks)."""
    if h.cfg.train.compile:
        h.method.compile_encoders(**h.cfg.train.compile_options())


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


def run_steps(h: Harness, source: Iterator, steps: int, first_step: int = 0, laps: bool = False,
              on_step=None) -> tuple[float, list[dict]]:
    """Run `steps` training steps from `source`; (wall-clock seconds,
    synchronised at both ends; per-step stage seconds when `laps`).
    `on_step()` after each step (a progress bar; it must not synchronise)."""
    synchronize(h.device)
    start = time.perf_counter()
    if laps:
        h.laps.begin()
    for i in range(steps):
        anchor, query = next(source)
        h.laps.lap("data")
        h.step(anchor, query, first_step + i)
        h.laps.end_step()
        if on_step is not None:
            on_step()
    synchronize(h.device)
    wall = time.perf_counter() - start
    return wall, (h.laps.finish() if laps else [])


def run_windows(h: Harness, source: Iterator, steps: int, repeats: int, first_step: int = 0, laps: bool = False,
                on_step=None) -> tuple[list[float], list[list[dict]]]:
    """`repeats` consecutive windows of `steps` steps: (seconds per step of
    each window, each window's per-step stage seconds when `laps`)."""
    per_step, stages = [], []
    for r in range(repeats):
        wall, marked = run_steps(h, source, steps, first_step + r * steps, laps=laps, on_step=on_step)
        per_step.append(wall / steps)
        stages.append(marked)
    return per_step, stages


def progress_bar(total: int, desc: str, enabled: bool):
    """The progress bar training uses (tqdm), on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True, mininterval=0.5,
                leave=False)


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
            losses, _, _ = h.step.forward(anchor_u8, query_u8, 0)
            losses["loss"].backward()
    finally:
        if saib is not None:
            saib.impl = impl
        h.step.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def describe(cfg: Config) -> str:
    t, k = cfg.train, cfg.kernels
    saib = f" +SAIB ({k.saib_impl})" if cfg.saib.enabled else ""
    return (f"{cfg.method.name} {cfg.model.backbone}{saib}, batch {t.batch_size}, {cfg.data.image_size} px, "
            f"{t.precision}{', channels-last' if t.channels_last else ''}, compile {'on' if t.compile else 'off'}, "
            f"view prep {k.view_prep}")
