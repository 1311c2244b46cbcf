"""Whether the Triton kernels can run on a device, and the one-time fallback warning.

Triton runs on CUDA tensors, and on CPU tensors only through its interpreter,
which is chosen when a kernel is *decorated*: `TRITON_INTERPRET=1` must be in
the environment before the kernel modules are imported. Nothing here imports
triton at module import time, so `model/` can import this file on any machine.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import torch

_warned: set[str] = set()

#: the modules that define Triton kernels (decorated when imported)
KERNEL_MODULES = ("iecl.kernels.saib_gemm", "iecl.kernels.saib_passes", "iecl.kernels.view_prep_triton")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | str) -> tuple[bool, str]:
    """(True, "") when the Triton kernels can run on `device`, else (False, why)."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, ""
    if device.type != "cpu":
        return False, f"Triton kernels do not run on {device.type} tensors"
    if not interpreting():
        return False, "on CPU the Triton kernels need TRITON_INTERPRET=1 (set before triton is imported)"
    # A kernel module imported before TRITON_INTERPRET=1 was set holds compiled-mode
    # kernels (JITFunction), which cannot run on CPU tensors; one imported later is fine.
    for name in KERNEL_MODULES:
        module = sys.modules.get(name)
        if module is not None and any(type(v).__name__ == "JITFunction" for v in vars(module).values()):
            return False, "TRITON_INTERPRET=1 was set after the kernels were imported; set it before starting Python"
    return interpreter_numpy_check()


def interpreter_numpy_check() -> tuple[bool, str]:
    """Triton 3.6's interpreter (and earlier) turns a kernel's integer argument
    into a Python int with `int(array_of_shape_1)`, which NumPy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars", from the
    first loop over a run-time bound); Triton 3.7 fixed it. Seen with Triton
    3.6.0 and NumPy 2.4.6 (2.3.5 works)."""
    triton_version, numpy_version = _version("triton"), _version("numpy")
    if triton_version < (3, 7) and numpy_version >= (2, 4):
        found = f"triton {'.'.join(map(str, triton_version))} with numpy {'.'.join(map(str, numpy_version))}"
        return False, (f"the interpreter of Triton before 3.7 fails with NumPy 2.4 or newer ({found}): "
                       "pip install 'numpy<2.4' or a newer triton")
    return True, ""


def _version(dist: str) -> tuple[int, int]:
    """(major, minor) of an installed distribution, read without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = version(dist).split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except (PackageNotFoundError, ValueError):
        return (0, 0)


def warn_fallback(what: str, reason: str) -> None:
    """One warning per (what, reason) per process: a fallback is a fact about the
    machine, not about the step, so repeating it every step would only be noise."""
    key = f"{what}: {reason}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{what}: Triton cannot run ({reason}); using the PyTorch reference", stacklevel=3)


#: Tests set this to fill every floating-point buffer the kernels' launchers
#: allocate with NaN, so that an element no kernel writes cannot pass unseen.
POISON_OUTPUTS = False


def empty(shape, *, device, dtype, memory_format=torch.contiguous_format) -> torch.Tensor:
    """torch.empty for kernel outputs (NaN-filled under POISON_OUTPUTS)."""
    out = torch.empty(shape, device=device, dtype=dtype, memory_format=memory_format)
    if POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out
