"""What SAIB's GEMM kernels compile to on Hopper (sm_90a), without a GPU.

    python -m iecl.kernels.saib_sm90        # one JSON line per kernel

Compiles (never runs) the TMA + wgmma kernels of `kernels/saib_gemm.py` at the
full-size tile configuration (batch 256, patch 16, bf16) for capability 9.0
through a stand-in CUDA driver, and reports per kernel: shared memory, whether
the TTGIR multiplies with wgmma and loads with TMA, the pendings of the wgmma
waits inside loops (> 0: pipelined), and ptxas's registers and spill bytes.
The tests run it in a fresh process (no TRITON_INTERPRET) to check the
structure the GPU relies on; a GPU says how fast it is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

#: Shared memory one block may use on an H100/H200.
SMEM_LIMIT = 227 * 1024


def _install_compile_only_driver():
    """A CUDA driver that reports capability 9.0, and launches that only compile."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import jit

    class CompileOnlyDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            raise RuntimeError("compile only")

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

    triton.runtime.driver.set_active(CompileOnlyDriver())
    compiled = []
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.__name__, kernel))
        return kernel

    jit.JITFunction.run = compile_only
    return compiled


def _loop_wait_pendings(ttgir: str) -> list[int]:
    """Pendings of every wgmma wait inside an scf.for / scf.while region."""
    stack, pendings = [], []
    for line in ttgir.splitlines():
        line = re.sub(r'"[^"]*"', '""', line)
        m = re.search(r"warp_group_dot_wait\b.*pendings\s*=\s*(\d+)", line)
        if m and "loop" in stack:
            pendings.append(int(m.group(1)))
        kind = "loop" if re.search(r"\bscf\.(for|while)\b", line) else "other"
        for brace in re.findall(r"[{}]", line):
            if brace == "{":
                stack.append(kind)
            elif stack:
                kind = stack.pop()
    return pendings


def _ptxas(ptx: str) -> dict:
    """Registers and spill bytes from ptxas -v, the one Triton compiles sm_90a
    with (None where this Triton has no such helper)."""
    import tempfile

    try:
        from triton.backends.nvidia.compiler import get_ptxas  # Triton 3.6 and 3.9

        path = get_ptxas(90).path
    except (ImportError, AttributeError, RuntimeError):
        return {"registers": None, "spill_bytes": None}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        log = subprocess.run([path, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             check=False, capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"registers": regs and int(regs.group(1)), "spill_bytes": sum(spills) if spills else None}


def _launch_full_size_gemms() -> None:
    """One launch of each GEMM configuration a batch-256, patch-16 bf16 step uses."""
    import torch

    from iecl.kernels import saib_gemm
    from iecl.kernels.saib_passes import Geometry

    saib_gemm.sm_count = lambda device: 132
    d = 256
    geo = Geometry(d, 16, 16, 16, False, 0)  # one patch row per channel: tiny buffers, full-size tiles
    rows = geo.rows
    bf16 = {"device": "cpu", "dtype": torch.bfloat16}
    mat = lambda r, c: torch.zeros(r, c, **bf16)
    vec = torch.zeros(2 * d)
    framed = mat(3 * geo.framed_rows, d)
    saib_gemm.gemm(framed, mat(9 * 2 * d, d), rows, geo, taps=9, framed=True, epi=saib_gemm.EPI_STATS)
    saib_gemm.gemm(mat(rows, 2 * d), mat(2 * d, 2 * d), rows, geo, epi=saib_gemm.EPI_GRAD, res=mat(rows, 2 * d),
                   below=(mat(rows, 2 * d), vec, vec, vec, vec))
    saib_gemm.wgrad(mat(3 * geo.framed_rows, 2 * d), framed, rows, geo, taps=9, dz_framed=True, a_framed=True)


def report() -> list[dict]:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    compiled = _install_compile_only_driver()
    _launch_full_size_gemms()
    rows = []
    for name, kernel in compiled:
        ttgir = kernel.asm.get("ttgir", "")
        rows.append({"kernel": name, "shared": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps,
                     "wgmma": re.search(r"\bwarp_group_dot\b(?!_wait)", ttgir) is not None,
                     "tma_loads": "async_tma_copy_global_to_local" in ttgir,
                     "loop_wait_pendings": _loop_wait_pendings(ttgir), **_ptxas(kernel.asm.get("ptx", ""))})
    return rows


if __name__ == "__main__":
    for row in report():
        print(json.dumps(row), flush=True)
    sys.exit(0)
