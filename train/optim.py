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

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
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
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, updates)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])


def build_optimizer(groups: list[dict], cfg: OptimConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (PyTorch's fused kernel on a GPU, the multi-tensor one on a CPU) or
    LARS; NVIDIA apex's fused versions only when asked for (optim.impl=apex)."""
    if cfg.name in ("lars", "sgd"):
        if cfg.impl == "apex":
            raise ConfigError(f"optim.impl=apex is for AdamW (apex FusedAdam); use optim.impl=torch with {cfg.name}")
        if cfg.name == "lars":
            return LARS(groups, lr=lr, momentum=cfg.betas[0])
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.betas[0], **fused)
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
    if device.type == "cuda":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, foreach=True)


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
