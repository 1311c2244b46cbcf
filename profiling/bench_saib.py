"""Benchmark SAIB's implementations: eager reference, torch.compile of the
functional reference, and the Triton kernels; forward, backward and both.

    iecl bench saib --batch-size 256 --image-size 224 --patch 16 --dtype bf16
    iecl bench saib --batch-size 8 --image-size 32 --patch 8 --dtype fp32 --iters 3   # CPU toy

FLOP count (GEMMs only; BatchNorm, Swish and the skips are memory-bound and
not counted). With R = 3*H*W rows (pixels of all patch-images) and D = B
channels, a GEMM (M x K) @ (K x N) costs 2*M*K*N:

    conv1 1x1 D->D    2 * R * D  * D   =  2 R D^2
    conv2 3x3 D->2D   2 * R * 9D * 2D  = 36 R D^2
    conv3 1x1 2D->2D  2 * R * 2D * 2D  =  8 R D^2
    conv4 1x1 2D->D   2 * R * 2D * D   =  4 R D^2
    forward = 50 R D^2;  backward = 2 x forward (input and weight gradients)

Times are medians over `iters` timed runs after `warmup` untimed ones, with
their IQR and min-max (profiling/stats.py), with CUDA events on a GPU and
time.perf_counter on a CPU. Each implementation's TFLOP/s
is also given as a share of a bf16 torch.matmul of large square matrices
measured in the same run. On a CPU the Triton kernels run in the interpreter
(TRITON_INTERPRET=1, set here before they are imported): those numbers show
that the path runs, not how fast it is.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from contextlib import nullcontext

import torch

from iecl.profiling import checks, stats
from iecl.profiling.choices import SAIB_IMPLS as IMPLS
from iecl.profiling.machine import device_name
from iecl.train.step import (
    DTYPES,  # precision name -> torch dtype, as the training step reads it
)


def saib_flop(batch_size: int, image_size: int) -> dict[str, float]:
    rows, d = 3 * image_size * image_size, batch_size
    forward = 50 * rows * d * d
    return {"forward": forward, "backward": 2 * forward, "forward_backward": 3 * forward}


def _timer(device: torch.device):
    """fn -> seconds, synchronised (CUDA events on a GPU)."""
    if device.type == "cuda":
        def measure(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def measure(fn) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    return measure


def _timed_ms(fn, setup, iters: int, warmup: int, device: torch.device, tick=None) -> dict:
    """`fn(setup())` run `warmup + iters` times: a summary of the timed runs, in ms.
    `tick()` after each run (a progress bar)."""
    measure = _timer(device)
    times = []
    for i in range(warmup + iters):
        state = setup()
        seconds = measure(functools.partial(fn, state))
        if i >= warmup:
            times.append(1e3 * seconds)
        if tick is not None:
            tick()
    return stats.summary(times)


PHASES = ("forward", "backward", "forward_backward")


def _time_phases(saib, x, autocast, iters: int, warmup: int, device: torch.device, tick=None) -> dict:
    grad_out = torch.randn_like(x)

    def forward(_=None):
        with autocast:
            return saib(x)

    def fresh_forward():
        saib.zero_grad(set_to_none=True)
        return forward()

    def forward_backward(_):
        fresh_forward().backward(grad_out)

    timed = {
        "forward": _timed_ms(forward, lambda: None, iters, warmup, device, tick),
        "backward": _timed_ms(lambda out: out.backward(grad_out), fresh_forward, iters, warmup, device, tick),
        "forward_backward": _timed_ms(forward_backward, lambda: None, iters, warmup, device, tick),
    }
    row = {}
    for phase, summary in timed.items():
        row[f"{phase}_ms"] = summary["median"]
        row[f"{phase}_ms_stats"] = summary
    return row


def matmul_tflops(device: torch.device, iters: int, warmup: int) -> float:
    """bf16 torch.matmul of large square matrices: the device's practical GEMM rate."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = _timed_ms(lambda _: torch.matmul(a, b), lambda: None, iters, warmup, device)["median"]
    return 2 * n**3 / (ms / 1e3) / 1e12


def _prepare_triton(device: torch.device) -> tuple[bool, str]:
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    from iecl.kernels._triton import triton_available

    return triton_available(device)


def run(batch_size: int = 256, image_size: int = 224, patch: int = 16, dtype: str = "bf16",
        device: str | None = None, iters: int = 50, warmup: int = 10, impls=IMPLS,
        compile_on_cpu: bool = False, progress: bool = False) -> dict:
    """Time every implementation; returns one JSON-serialisable dict."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = DTYPES[dtype]
    notes = []
    triton_ok, why = _prepare_triton(device) if "triton" in impls else (False, "not requested")
    # After _prepare_triton, so that on a CPU the kernels see TRITON_INTERPRET=1.
    from iecl.model.saib import SAIB

    torch.manual_seed(0)
    # Channels-last weights, as the training step has them (train.loop converts the
    # whole method): with OIHW weights the 3x3's weight loads would be strided gathers.
    base = SAIB(batch_size, (image_size, image_size), patch).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).to(torch_dtype)
    x = x.contiguous(memory_format=torch.channels_last)  # what the view preparation hands over
    autocast = torch.autocast(device.type, dtype=torch_dtype) if torch_dtype != torch.float32 else nullcontext()
    flop = saib_flop(batch_size, image_size)
    peak = matmul_tflops(device, iters, warmup)
    results, flags, todo = {}, [], []
    for impl in impls:
        if impl == "triton" and not triton_ok:
            notes.append(f"triton skipped: {why}")
        elif impl == "compile" and device.type == "cpu" and not compile_on_cpu:
            notes.append("compile skipped on CPU (minutes to compile; --compile-on-cpu to include)")
        else:
            todo.append(impl)
    from tqdm import tqdm

    # Under Triton's interpreter one run takes seconds: the bar shows each one.
    bar = tqdm(total=len(todo) * len(PHASES) * (warmup + iters), desc="bench saib", unit="run",
               disable=not progress, dynamic_ncols=True, mininterval=0.5)
    for impl in todo:
        bar.set_postfix_str(impl)
        saib = SAIB(batch_size, (image_size, image_size), patch, impl=impl).to(device, memory_format=torch.channels_last)
        saib.load_state_dict(base.state_dict())
        row = _time_phases(saib, x, autocast, iters, warmup, device, tick=bar.update)
        for phase in PHASES:
            tflops = flop[phase] / (row[f"{phase}_ms"] / 1e3) / 1e12
            row[f"{phase}_tflops"] = tflops
            row[f"{phase}_share_of_matmul"] = tflops / peak
            flags.append(checks.faster_than_matmul(f"SAIB {impl} {phase}", tflops / peak, device_name(device)))
        results[impl] = row
    bar.close()
    if device.type == "cpu":
        notes.append("CPU: the bf16 matmul reference rate is slow on CPUs (shares can exceed 100%)")
        if "triton" in results:
            notes.append("CPU: Triton ran in its interpreter; its times measure the interpreter, not the kernels")
    return {
        "config": {"batch_size": batch_size, "image_size": image_size, "patch": patch, "dtype": dtype,
                   "device": str(device), "device_name": device_name(device), "iters": iters, "warmup": warmup,
                   "weights": "channels_last",
                   "torch": torch.__version__},
        "flop": {**flop, "formula": "forward = 50 * (3*H*W) * B^2 (GEMMs, 2*M*K*N each); backward = 2 x forward"},
        "matmul_bf16_tflops": peak,
        "results": results,
        "notes": notes,
        "flags": [f for f in flags if f is not None],
    }


def format_table(report: dict) -> str:
    cfg = report["config"]
    lines = [
        (f"SAIB B={cfg['batch_size']} {cfg['image_size']}px p={cfg['patch']} {cfg['dtype']} on {cfg['device_name']}; "
         f"bf16 matmul {report['matmul_bf16_tflops']:.4g} TFLOP/s; forward {report['flop']['forward'] / 1e9:.4g} GFLOP; "
         f"median of {cfg['iters']} runs after {cfg['warmup']}"),
        f"{'impl':<10} {'phase':<17} {'ms':>10} {'IQR ms':>19} {'min-max ms':>19} {'TFLOP/s':>9} {'of matmul':>10}",
    ]
    for impl, row in report["results"].items():
        for phase in PHASES:
            s = stats.of(row.get(f"{phase}_ms_stats") or row[f"{phase}_ms"])
            lines.append(f"{impl:<10} {phase:<17} {s['median']:>10.3f} {s['q1']:>9.3f}-{s['q3']:<9.3f} "
                         f"{s['min']:>9.3f}-{s['max']:<9.3f} {row[f'{phase}_tflops']:>9.3g} "
                         f"{row[f'{phase}_share_of_matmul']:>9.1%}")
    lines += [f"note: {note}" for note in report["notes"]]
    lines += checks.lines(report.get("flags", []))
    return "\n".join(lines)


def run_args(args: argparse.Namespace) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    warmup = args.warmup if args.warmup is not None else (10 if device.startswith("cuda") else 1)
    impls = tuple(impl for impl in args.impls.split(",") if impl)
    unknown = set(impls) - set(IMPLS)
    if unknown:
        from iecl.train.config import (
            ConfigError,  # a one-line user error at the command line
        )

        raise ConfigError(f"unknown --impls {sorted(unknown)}; choose from {IMPLS}")
    report = run(args.batch_size, args.image_size, args.patch, args.dtype, device, args.iters, warmup, impls,
                 args.compile_on_cpu, progress=not args.no_progress)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report
