"""The encoder step's fast path (issue 15), checked on the CPU: the single-process
step makes no device->host sync; compile makes one graph per encoder and grad
mode; spectral norm runs once per step outside the compiled graphs; compiled
and eager losses agree."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch.overrides import TorchFunctionMode

from iecl.train.loop import build_model, build_step

CPU = torch.device("cpu")

#: Tensor methods that hand a value to the host: on a GPU each one waits for the device.
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy}


class HostReads(TorchFunctionMode):
    """Records every Tensor method call that reads a value on the host. On a
    CPU such a read costs nothing, but on a GPU it is a sync: this is the
    CPU-checkable proxy for `torch.cuda.set_sync_debug_mode("error")`."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _views(cfg, count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.train.batch_size, cfg.data.image_size, cfg.data.image_size, 3)
    return [tuple(torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8) for _ in range(2))
            for _ in range(count)]


def _step(tmp_path, updates: dict | None = None):
    cfg = tiny_config(tmp_path, tmp_path, {"saib": {"enabled": True}, **(updates or {})})
    method, optimizer, scaler, base_lr = build_model(cfg, CPU, world_size=1)
    method.train()
    return cfg, method, build_step(cfg, method, optimizer, scaler, base_lr, steps_per_epoch=8, device=CPU,
                                   report=False)


def test_the_host_read_detector_sees_a_read():
    """The proxy can fail: the reads the step used to make are caught."""
    with HostReads() as mode:
        bool(torch.isfinite(torch.tensor(1.0)))
        torch.tensor(2.0).item()
        torch.tensor([1, 2]).tolist()
    assert mode.reads == ["__bool__", "item", "tolist"]


@pytest.mark.slow
def test_a_single_process_step_reads_nothing_on_the_host(tmp_path):
    """Steps between the guard's reads make no host read, a NaN step included,
    and that NaN step is skipped on the device: no weight, optimizer state or
    target changes; the guard counts it when read. (Each optimizer's skip:
    tests/test_optim.py.)"""
    cfg, method, step = _step(tmp_path, {"optim": {"name": "lars"}, "train": {"max_nonfinite": 5, "batch_size": 4}})
    assert step.skips_on_device()
    views = _views(cfg, 2)
    before = {k: v.clone() for k, v in method.state_dict().items() if k.endswith(("weight", "bias", "original", "pos_embed"))}
    with HostReads() as mode:
        step(*views[0], 0)
    assert mode.reads == []
    changed = {k for k, v in before.items() if not torch.equal(method.state_dict()[k], v)}
    assert any(k.startswith("online.") for k in changed) and any(k.startswith("target.") for k in changed)

    before = {k: method.state_dict()[k].clone() for k in before}
    state_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in step.optimizer.state.items()}
    loss_on_views = method.loss_on_views

    def nan_loss(anchor, query):
        losses, embeddings = loss_on_views(anchor, query)
        return {**losses, "loss": losses["loss"] * float("nan")}, embeddings

    method.loss_on_views = nan_loss
    with HostReads() as mode:
        outcome = step(*views[1], 1)
    assert mode.reads == []
    for key, value in before.items():
        assert torch.equal(method.state_dict()[key], value), key
    for param, state in step.optimizer.state.items():
        for key, value in state.items():
            assert torch.equal(value, state_before[id(param)][key]), key
    assert not outcome.updated and step.faults.total == 1


def test_the_guard_reads_when_a_stop_could_be_due():
    """With limit L the pending losses are read by the (L+1)-th unread step at
    the latest, so a run stops at the same step as with a per-step check."""
    from iecl.train.faults import NonFiniteGuard, NonFiniteLoss

    guard = NonFiniteGuard(limit=2, report=False)
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    with HostReads() as mode:
        guard.defer(one, 0)
        guard.defer(nan, 1)
    assert mode.reads == [] and guard.streak == 0
    guard.defer(nan, 2)  # three unread: a stop could be due; read: streak 2, not past the limit
    assert guard.streak == 2 and guard._total == 2
    with pytest.raises(NonFiniteLoss, match=r"3 step\(s\) in a row \(steps 2 to 4"):
        guard.defer(nan, 3)
