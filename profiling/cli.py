"""The `iecl bench ...`, `iecl profile`, `iecl compare` and `iecl report`
commands; iecl.cli adds them to the `iecl` command (COMMANDS).

Only the parsers live here, and they import nothing heavy (no torch, no
model registry): `iecl --help` and these commands' argument errors answer at
once. Each command's implementation is imported when it runs."""

from __future__ import annotations

import argparse

from iecl.profiling.choices import (
    IMAGENET_TRAIN_IMAGES,
    PRECISIONS,
    SAIB_CHOICES,
    SAIB_IMPLS,
)


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and every option's default after its help
    (unless the help already states it, or there is none to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or "default" in text):
            return text
        shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {shown})"

BENCH_HELP = """\
Benchmarks: each prints a table and writes one JSON object (--json).

  iecl bench loader --backend pil dali ffcv --data /data/synthetic-10k --batch-size 256 --device cuda
  iecl bench saib --batch-size 256 --image-size 224 --patch 16 --dtype bf16 --json saib.json
"""

SAIB_HELP = """\
SAIB forward, backward and forward+backward times (median of --iters runs,
with their IQR and min-max; CUDA events on a GPU, warm-up excluded) for the eager PyTorch reference,
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
images/s is the median of --repeats windows of --steps batches, with the
windows' IQR and min-max.

For ffcv, DATA may be a .beton, or a folder that is converted once into
--beton (default: under ~/.cache/iecl/bench) and reused.

For dali, with two --decode modes the output says which was faster and by
how much (with the windows' spread); --decode-only also times decoding alone
(same reader, files and decoder options, no crop, resize or colour work) and
prints decoding's share of the loader's time per image; --hw-decoder-load
times the loader at each value of dali.hw_decoder_load (nvJPEG's hardware
decoder share: GPUs only; on a CPU one run stands for all, and says so);
--exec-dynamic also times each DALI run with DALI's dynamic executor
(dali.exec_dynamic=true: the same batches) and prints which executor won.

  iecl bench loader --backend pil --data /data/synthetic-10k --batch-size 256 --steps 10 --repeats 5 --workers 16
  iecl bench loader --backend dali --decode shared window --data /data/synthetic-10k --device cuda --json dali.json
  iecl bench loader --backend dali --decode-only --hw-decoder-load 0 0.65 0.9 --data /data/synthetic-10k --device cuda
  iecl bench loader --backend dali --exec-dynamic --data /data/synthetic-10k --device cuda
"""


def register(commands) -> None:
    bench = commands.add_parser(
        "bench", help="benchmarks (loader, saib)", description=BENCH_HELP,
        formatter_class=DefaultsFormatter,
    )
    which = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    p = which.add_parser(
        "loader", help="loader-only throughput per backend", description=LOADER_HELP,
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--backend", nargs="+", choices=("pil", "dali", "ffcv"), default=["pil"], help="one or more")
    p.add_argument("--data", required=True, metavar="DATA", help="what data.root accepts; a .beton for ffcv")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--image-size", type=int, default=224, help="crop size in pixels")
    p.add_argument("--steps", type=int, default=10, help="timed steps per window")
    p.add_argument("--repeats", type=int, default=5, help="timing windows: img/s is their median, with IQR and min-max")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where the views are delivered")
    p.add_argument("--workers", type=int, default=None, help="loader processes/threads (default: all cores)")
    p.add_argument("--recipe", choices=("mocov2", "simclr", "byol"), default="mocov2", help="augmentation recipe")
    p.add_argument("--decode", nargs="+", choices=("shared", "window"), default=["shared"], help="dali decode mode(s)")
    p.add_argument("--decode-only", action="store_true",
                   help="dali: also time decoding alone for each run (same reader, files and decoder options; no crop, "
                        "resize or colour work), and print its share of the loader's time per image")
    p.add_argument("--hw-decoder-load", nargs="+", type=float, metavar="SHARE",
                   help="dali: time each of these dali.hw_decoder_load values, the share of each batch nvJPEG gives "
                        "the hardware JPEG decoder (A100/H100/H200; ignored on a CPU, where one run stands for all) "
                        "(default: the shipped 0.65)")
    p.add_argument("--exec-dynamic", action="store_true",
                   help="dali: also time each run with DALI's dynamic executor (dali.exec_dynamic=true; the shipped "
                        "value is false), and print which executor was faster")
    p.add_argument("--beton", metavar="PATH",
                   help="ffcv: where to write/read the converted folder (default: under ~/.cache/iecl/bench)")
    p.add_argument("--seed", type=int, default=0, help="augmentation seed")
    p.add_argument("--json", metavar="PATH", help="write the result as one JSON object")
    p.set_defaults(run=_run_loader)


    p = which.add_parser(
        "saib", help="SAIB kernels against the reference and torch.compile", description=SAIB_HELP,
        formatter_class=DefaultsFormatter,
    )
    add_saib_arguments(p)
    p.set_defaults(run=_run_saib)
    from iecl.profiling import bench_draws  # a light module: its parser only

    bench_draws.register(which)


def add_saib_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=256, help="SAIB's channels: the batch")
    parser.add_argument("--image-size", type=int, default=224, help="view size in pixels")
    parser.add_argument("--patch", type=int, default=16, help="patch size in pixels")
    parser.add_argument("--dtype", choices=PRECISIONS, default="bf16", help="autocast dtype (fp32: none)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--iters", type=int, default=50, help="timed runs of each phase")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 10 on a GPU, 1 on a CPU)")
    parser.add_argument("--impls", default=",".join(SAIB_IMPLS), help=f"comma-separated subset of {','.join(SAIB_IMPLS)}")
    parser.add_argument("--compile-on-cpu", action="store_true", help="also time torch.compile on a CPU")
    parser.add_argument("--json", type=str, default=None, help="write the report to this path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


PROFILE_HELP = """\
Where one training step's time goes, stage by stage: data wait, view
preparation, SAIB forward, online and target encoder forwards, heads and loss,
the non-finite check, backward (SAIB's share separately), optimizer, momentum
update. Each stage is measured in place (device events between the stages of
--repeats windows of --steps real steps, after --warmup) and alone (median of
--isolate-iters); then images/s, the step's TFLOP/s and this machine's
measured bf16 matmul rate. Every time is a median with its IQR and min-max;
results that cannot be true (stages that do not add up to the step, a loader
faster than data on the device, in-place and isolated times 2x apart) are
flagged. The step is built from the same config and overrides as `iecl pretrain`.

  iecl profile --config imagenet_r50 data.root=/data/imagenet/train data.backend=dali
  iecl profile --config imagenet_r50 --data-on-device train.compile=true --trace step.json.gz
  iecl profile train.max_steps=10 --steps 5 --repeats 2 --warmup 2     # the smoke config, on a CPU
"""


def _add_config_arguments(p) -> None:
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, as for iecl pretrain")
    p.add_argument("--config", metavar="NAME|PATH", help="a shipped config or a YAML file (default: smoke)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per window (default 10)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timing windows: each figure is their median, with IQR and min-max (default 3)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first: cuDNN tuning, compilation (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register_profile(commands) -> None:
    p = commands.add_parser(
        "profile", help="step time breakdown: data, SAIB, encoders, backward, optimizer",
        description=PROFILE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(p)
    p.add_argument("--isolate-iters", type=int, default=10, help="runs of each stage alone (default 10; 0: in place only)")
    p.add_argument("--data-on-device", action="store_true",
                   help="no loader: random uint8 views already on the device (the model-only ceiling)")
    p.add_argument("--trace", metavar="PATH", help="also write a torch.profiler Chrome/Perfetto trace (.json or .json.gz)")
    p.add_argument("--trace-steps", type=int, default=3, help="steps in the trace (default 3)")
    p.add_argument("--json", metavar="PATH", help="write the report as one JSON object")
    p.set_defaults(run=_run_profile)


def _run_profile(args) -> int:
    from iecl.profiling.step_profile import run_args

    return run_args(args)


def _run_saib(args) -> int:
    from iecl.profiling.bench_saib import run_args

    run_args(args)
    return 0


def _run_loader(args) -> int:
    from iecl.profiling.bench_loader import main

    return main(args)



COMPARE_HELP = """\
Time per ImageNet-1k epoch of every method (iecl, mocov2, simclr, byol,
simsiam), with and without SAIB, at the same batch, backbone, image size and
precision (each method keeps its own recipe otherwise): the step time with
the data already on the device (the model-only ceiling) and with the real
loader, projected to one epoch of 1,281,167 images (floor(images / batch)
steps), their ratio (the loader's efficiency) and SAIB's added time per
method. Each step time is the median of --repeats windows of --steps steps,
with the windows' IQR and min-max; a difference inside the spread is printed
as "within noise", and what cannot be true beyond it (a loader faster than
data on the device, SAIB making a step faster) is flagged. Writes compare.md,
compare.json and compare.png (the paper's Figures 7 and 8) into --out.

  iecl compare --config imagenet_r50 data.root=/data/imagenet/train data.backend=dali --out results/r50
  iecl compare --config imagenet_r18 --methods iecl simclr --saib both --no-loader
  iecl compare train.batch_size=8 data.image_size=32 --steps 2 --repeats 3 --warmup 1   # a CPU toy run
"""


def register_compare(commands) -> None:
    p = commands.add_parser(
        "compare", help="epoch time of every method with and without SAIB (table, JSON, chart)",
        description=COMPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(p)
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="registered method names: iecl and the baselines (default: all of them)")
    p.add_argument("--saib", choices=SAIB_CHOICES, default="both", help="SAIB off, on or both (default both)")
    p.add_argument("--no-loader", action="store_true", help="only the model-only timing (data on the device)")
    p.add_argument("--epoch-images", type=int, default=IMAGENET_TRAIN_IMAGES,
                   help=f"images in the projected epoch (default {IMAGENET_TRAIN_IMAGES:,}, ImageNet-1k train)")
    p.add_argument("--out", metavar="DIR", help="where to write compare.{md,json,png} (default runs/compare-...)")
    p.set_defaults(run=_run_compare)


def _run_compare(args) -> int:
    from iecl.profiling.compare import run_args

    return run_args(args)


REPORT_HELP = """\
Everything this project measures on a GPU machine, in one command, within a
time budget: the machine's ceilings (bf16 matmul, device copy), SAIB's
implementations alone, the loaders alone (pil on every core, DALI, FFCV), the
IE-CL + SAIB step of ResNet-50 and ResNet-18 with the real loader and with
the data on the device, compile off and on, SAIB's share per
implementation, the step's eager levers (spectral norm batched or per
convolution, a padded stem, both views in one encoder call) against its
defaults, every method with and without SAIB, a plain supervised ResNet-50
step as an anchor, and the exported backbone loaded into torchvision and
timm. Writes DIR/report.md, one JSON per part, the charts and logs/, and
with --pack DIR.tar.gz.

Each part runs in a process of its own under its share of the budget (the
time left, in proportion to the part's estimate among those still to run); a
part that fails is recorded with its error and one that overruns its share
(a long torch.compile warm-up) is stopped and reported; the rest still run.
A folder can be filled in several calls (--parts), and report.md shows
everything in it. Exit status 1 if a part failed.

--dry-run runs every part at toy sizes (about two minutes on a 2-core CPU,
most of it Triton's interpreter and ten small compare configurations):
a check, before a GPU is there, that the full run will not fail at start.
On a machine with no package index, run the source checkout itself:
python3 CHECKOUT report ...

  iecl report --out results/h200 --pack
  iecl report --out results/h200 --config imagenet_r50 --budget-minutes 20 --data /data/imagenet/train
  iecl report --out /tmp/dry --dry-run
  iecl report --out results/h200 --parts machine saib data      # now; the rest in a later call
"""


def register_report(commands) -> None:
    from iecl.profiling.report.plan import DRY_RUN, FULL, PART_NAMES

    p = commands.add_parser(
        "report", help="measure a GPU machine end to end, within a time budget (report.md, JSON, charts)",
        description=REPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides for every training part, applied last")
    p.add_argument("--out", required=True, metavar="DIR", help="the report folder (created; an earlier report of the same plan is added to)")
    p.add_argument("--config", default="imagenet_r50", metavar="NAME|PATH",
                   help="the IE-CL configuration the training parts start from (default imagenet_r50)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help=f"wall-clock budget of the whole command (default {FULL.budget_minutes:g}; "
                        f"{DRY_RUN.budget_minutes:g} with --dry-run)")
    p.add_argument("--data", metavar="DIR", help="JPEGs for the loader parts (default: make synthetic ones under --work)")
    p.add_argument("--work", default="~/.cache/iecl/report", metavar="DIR",
                   help="scratch space: synthetic JPEGs, FFCV files (default ~/.cache/iecl/report)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--dry-run", action="store_true", help="every part at toy sizes: proves the command runs here")
    p.add_argument("--parts", nargs="+", metavar="PART", help=f"only these, of: {' '.join(PART_NAMES)}")
    p.add_argument("--skip", nargs="+", metavar="PART", help="all but these")
    p.add_argument("--pack", action="store_true", help="also write DIR.tar.gz, the whole report in one file")
    p.add_argument("--run-part", metavar="PART", help=argparse.SUPPRESS)  # the child process's side
    p.set_defaults(run=_run_report)


def _run_report(args) -> int:
    from iecl.profiling.report.runner import run_args

    return run_args(args)


#: what iecl.cli registers, in the order `iecl --help` lists them
COMMANDS = (register, register_profile, register_compare, register_report)
