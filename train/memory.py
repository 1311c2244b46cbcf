"""Will one training step fit in memory? A lower bound, checked at start.

A step keeps, for its backward, at least the output of every layer of the
online encoder's forward on one view. That size is found exactly by running
the backbone on PyTorch's meta device (shapes only: no memory, no compute),
then scaled by the batch and the autocast dtype. The true peak is larger (the
second view, the target, SAIB, the heads, the allocator's slack), so a run is
refused only when even this lower bound exceeds the device's whole memory:
what is refused could never have run, and nothing that could is refused.
"""

from __future__ import annotations

import os

import torch

from iecl.model.resnet import build_backbone
from iecl.train.config import Config, ConfigError
from iecl.train.run_dir import size_text
from iecl.train.step import DTYPES


def activation_bytes(backbone: str, image_size: int, batch_size: int, dtype: torch.dtype) -> int:
    """Bytes of the backbone's layer outputs for one view of a batch (the least
    a training forward keeps for its backward)."""
    with torch.device("meta"):
        model = build_backbone(backbone, spectral_norm=False).eval()  # eval: BatchNorm takes a batch of one
        total = 0

        def count(module, inputs, output) -> None:
            nonlocal total
            if isinstance(output, torch.Tensor):
                total += output.numel()

        hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
        try:
            model(torch.empty(1, 3, image_size, image_size))
        finally:
            for h in hooks:
                h.remove()
    return total * batch_size * torch.empty((), dtype=dtype).element_size()


def device_memory(device: torch.device) -> int:
    """The device's whole memory in bytes: a GPU's, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(cfg: Config, device: torch.device) -> None:
    """A `ConfigError` with the estimate when a step cannot fit on `device`."""
    t = cfg.train
    need = activation_bytes(cfg.model.backbone, cfg.data.image_size, t.batch_size, DTYPES[t.precision])
    have = device_memory(device)
    if need > have:
        raise ConfigError(
            f"one step of {cfg.model.backbone} at data.image_size={cfg.data.image_size} and train.batch_size="
            f"{t.batch_size} ({t.precision}) keeps at least {size_text(need)} of activations for its backward, "
            f"more than the {size_text(have)} this {device.type.upper()} has: lower data.image_size or train.batch_size"
        )
