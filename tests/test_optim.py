"""Optimizers (train/optim.py)."""

from __future__ import annotations

import pytest
import torch

from iecl.train.config import ConfigError, OptimConfig
from iecl.train.optim import (
    LARS,
    build_optimizer,
    scaled_lr,
    skips_on_device,
    step_unless,
)


def _reference_lars_step(params, bufs, lr, momentum, weight_decay, eta):
    """One LARS step written plainly, parameter by parameter (MoCo v3's form)."""
    for p, buf in zip(params, bufs):
        update = p.grad.clone()
        if p.ndim > 1:
            update += weight_decay * p
            w_norm, u_norm = p.norm(), update.norm()
            if w_norm > 0 and u_norm > 0:
                update *= eta * w_norm / u_norm
        buf.mul_(momentum).add_(update)
        p.sub_(lr * buf)


def test_lars_matches_the_per_parameter_definition():
    torch.manual_seed(0)
    shapes = [(8, 4, 3, 3), (8,), (16, 8), (16,), (5, 5)]
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    twins = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in twins]
    opt = LARS([{"params": params, "weight_decay": 1e-4}], lr=0.3, momentum=0.9, eta=0.001)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        opt.step()
        with torch.no_grad():
            _reference_lars_step(twins, bufs, 0.3, 0.9, 1e-4, 0.001)
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.detach(), t, rtol=1e-6, atol=1e-7)


def test_lr_scaling():
    assert scaled_lr(OptimConfig(lr=0.3), 1024) == pytest.approx(1.2)
    assert scaled_lr(OptimConfig(lr=0.3, lr_scaling="none"), 1024) == pytest.approx(0.3)


def test_apex_is_optional_and_its_absence_is_explained():
    try:
        import apex.optimizers  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="NVIDIA apex"):
            build_optimizer([{"params": [torch.zeros(2, requires_grad=True)]}], OptimConfig(impl="apex"), 0.1,
                            torch.device("cuda"))
    else:
        pytest.skip("NVIDIA apex is installed here")


@pytest.mark.parametrize("name", ["adamw", "lars", "sgd"])
def test_a_step_is_skipped_on_the_device(name):
    """`step_unless` with the flag set leaves parameters and state as they were,
    even with NaN gradients and on the very first step; the next real step is
    then the same as a fresh optimizer's first."""
    torch.manual_seed(0)
    shapes = [(6, 3, 3, 3), (6,), (4, 6)]
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    cfg = OptimConfig(name=name)
    opt = build_optimizer([{"params": params, "weight_decay": 1e-4}], cfg, 0.1, torch.device("cpu"))
    fresh = build_optimizer([{"params": twins, "weight_decay": 1e-4}], cfg, 0.1, torch.device("cpu"))
    assert skips_on_device(opt)
    start = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    step_unless(opt, torch.tensor(1.0))
    for p, s in zip(params, start):
        assert torch.equal(p.detach(), s)
    grads = [torch.randn_like(p) for p in params]
    for p, t, g in zip(params, twins, grads):
        p.grad, t.grad = g.clone(), g.clone()
    step_unless(opt, torch.tensor(0.0))
    fresh.step()
    for p, t, s in zip(params, twins, start):
        torch.testing.assert_close(p.detach(), t.detach(), rtol=1e-6, atol=1e-7)
        assert not torch.equal(p.detach(), s)
