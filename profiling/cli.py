"""The `iecl bench ...` commands, registered through the `iecl.commands` entry point."""

from __future__ import annotations

import argparse

BENCH_HELP = """\
Benchmarks: each prints a table and writes one JSON object (--json).

  iecl bench loader --backend pil dali ffcv --data /data/synthetic-10k --batch-size 256 --device cuda
  iecl bench saib --batch-size 256 --image-size 224 --patch 16 --dtype bf16 --json saib.json
"""

SAIB_HELP = """\
SAIB forward, backward and forward+backward times (median of --iters, CUDA
events on a GPU, warm-up excluded) for the eager PyTorch reference,
torch.compile of it and the Triton kernels, each with its achieved TFLOP/s and
its share of this machine's bf16 matrix-multiply rate, measured in the same run.
On a CPU the Triton rows time the interpreter (TRITON_INTERPRET=1 must be set
before starting), not the kernels: CPU runs only keep the command alive.

  iecl bench saib --batch-size 256 --image-size 224 --patch 16 --dtype bf16
  TRITON_INTERPRET=1 iecl bench saib --batch-size 8 --image-size 32 --patch 8 --dtype fp32 --iters 3
"""

LOADER_HELP = """\
Loader-only throughput: images/s of two augmented views per image, delivered
as uint8 NHWC tensors on the device, with no model. The first --warmup steps
(worker start-up, FFCV's JIT compilation, DALI's first allocations) are not
timed; on a GPU the device is synchronised before each clock reading. Peak
host memory is the resident memory of this process and its workers; peak GPU
memory is the device's used memory above what it was before the loader
started (it includes DALI's own pools, which PyTorch's counters miss).

For ffcv, DATA may be a .beton, or a folder that is converted once into
--beton (default: under ~/.cache/iecl/bench) and reused.

  iecl bench loader --backend pil --data /data/synthetic-10k --batch-size 256 --steps 50 --workers 16
  iecl bench loader --backend dali --decode shared window --data /data/synthetic-10k --device cuda --json dali.json
"""


def register(commands) -> None:
    bench = commands.add_parser(
        "bench", help="benchmarks (loader, saib)", description=BENCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    p = which.add_parser(
        "loader", help="loader-only throughput per backend", description=LOADER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backend", nargs="+", choices=("pil", "dali", "ffcv"), default=["pil"], help="one or more")
    p.add_argument("--data", required=True, metavar="DATA", help="what data.root accepts; a .beton for ffcv")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=50, help="timed steps (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--workers", type=int, default=None, help="loader processes/threads (default: all cores)")
    p.add_argument("--recipe", choices=("mocov2", "simclr", "byol"), default="mocov2")
    p.add_argument("--decode", nargs="+", choices=("shared", "window"), default=["shared"], help="dali decode mode(s)")
    p.add_argument("--beton", metavar="PATH", help="ffcv: where to write/read the converted folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the result as one JSON object")
    p.set_defaults(run=_run_loader)


    p = which.add_parser(
        "saib", help="SAIB kernels against the reference and torch.compile", description=SAIB_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from profiling.bench_saib import add_arguments

    add_arguments(p)
    p.set_defaults(run=_run_saib)


def _run_saib(args) -> int:
    from profiling.bench_saib import run_args

    run_args(args)
    return 0


def _run_loader(args) -> int:
    from profiling.bench_loader import main

    return main(args)
