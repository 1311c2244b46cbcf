"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch

from iecl.train.config import ConfigError, OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The base learning rate for this run: `lr` is quoted per 256 images."""
    return cfg.lr * global_batch / 256 if cfg.lr_scaling == "linear" else cfg.lr


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017),
    as MoCo v3 uses it for ResNet-50: matrices and conv kernels get weight decay
    and the trust ratio `eta * ||w|| / ||g + wd * w||`; biases and norm
    parameters (1-D) get plain momentum SGD. Written with multi-tensor ops so a
    ResNet-50 step is a few dozen kernel launches, not thousands.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta})

    #: `step` honours `found_inf` (see `step_unless`): the skip is decided on the device
    skips_on_device = True

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)  # set by `step_unless`, as GradScaler sets it on fused optimizers
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            if found_inf is not None:
                # A skipped step's gradients may be NaN: select, since NaN * 0 is NaN.
                apply = found_inf == 0
                updates = [torch.where(apply, g, 0.0) for g in updates]
            adapt = [i for i, p in enumerate(params) if p.ndim > 1]
            if adapt:
                w = [params[i] for i in adapt]
                g = torch._foreach_add([updates[i] for i in adapt], w, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(w))
                g_norm = torch.stack(torch._foreach_norm(g))
                ratio = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(g, list(ratio.unbind()))
                for i, u in zip(adapt, g):
                    updates[i] = u
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            if found_inf is None:
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, updates)
                torch._foreach_add_(params, bufs, alpha=-group["lr"])
            else:
                # Skipped: momentum 1, update 0, step 0 (each exact on finite values).
                one = torch.ones((), device=found_inf.device)
                torch._foreach_mul_(bufs, torch.where(apply, group["momentum"], one))
                torch._foreach_mul_(updates, apply.float())
                torch._foreach_add_(bufs, updates)
                torch._foreach_add_(params, torch._foreach_mul(bufs, apply.float() * -group["lr"]))


def build_optimizer(groups: list[dict], cfg: OptimConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD (PyTorch's fused kernels, on GPUs and CPUs) or LARS; NVIDIA
    apex's fused AdamW only when asked for (optim.impl=apex). All but apex's
    skip a step on the device (`step_unless`)."""
    if cfg.name in ("lars", "sgd"):
        if cfg.impl == "apex":
            raise ConfigError(f"optim.impl=apex is for AdamW (apex FusedAdam); use optim.impl=torch with {cfg.name}")
        if cfg.name == "lars":
            return LARS(groups, lr=lr, momentum=cfg.betas[0])
        sgd = torch.optim.SGD(groups, lr=lr, momentum=cfg.betas[0], fused=True)
        # Zero buffers from the start: the same first step as SGD's (buffer = gradient,
        # no dampening), and a first step skipped on the device leaves no uninitialised
        # buffer behind (fused SGD allocates it with empty_like and the skip never writes it).
        for group in sgd.param_groups:
            for param in group["params"]:
                sgd.state[param]["momentum_buffer"] = torch.zeros_like(param)
        return sgd
    if cfg.impl == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise ConfigError(
                "optim.impl=apex but NVIDIA apex (apex.optimizers) is not importable; build it from "
                "https://github.com/NVIDIA/apex (the package index's 'apex' is a different project) "
                "or use optim.impl=torch"
            ) from None
        return FusedAdam(groups, lr=lr, betas=cfg.betas, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=True)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `step_unless` can skip this optimizer's step without reading
    the flag on the host: LARS, and PyTorch's fused optimizers (the ones
    GradScaler hands `found_inf`)."""
    if getattr(optimizer, "skips_on_device", False):
        return True
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.defaults.get("fused"))


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """`optimizer.step()`, made a no-op on the device where `found_inf` (a
    0-d float tensor on the parameters' device) is nonzero: no host sync.
    GradScaler's protocol for fused optimizers (PyTorch's own state, such as
    Adam's step count, is left as it was)."""
    assert skips_on_device(optimizer), f"{type(optimizer).__name__} cannot skip a step on the device"
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier at `step` (0-based): linear warm-up, then cosine to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, base_lr: float | None = None) -> None:
    """`lr` for every group; groups marked `fixed_lr` (SimSiam's predictor) keep `base_lr`."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr if group.get("fixed_lr") and base_lr is not None else lr
