"""What a measurement ran on: the device's name and the software versions,
recorded beside every benchmark and profile."""

from __future__ import annotations

import platform
from importlib import metadata

import torch

#: distributions whose versions matter to the numbers (name prefix -> key);
#: DALI's distribution name carries its CUDA major (nvidia-dali-cuda120, -cuda130)
_PACKAGES = {"triton": "triton", "nvidia-dali-cuda": "dali", "ffcv": "ffcv"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def versions() -> dict:
    """Python, torch and, where installed, Triton, DALI and FFCV (read from the
    package metadata: importing FFCV would change torch's thread count); CUDA,
    cuDNN and the GPU when there is one."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        for prefix, key in _PACKAGES.items():
            if name == prefix or (prefix.endswith("-cuda") and name.startswith(prefix)):
                out.setdefault(key, dist.version)
    if torch.cuda.is_available():
        out.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=torch.cuda.get_device_name())
    return out
