"""`iecl bench loader`: loader-only throughput of each backend.

What is timed is what training waits for: from asking the loader for a batch
to having both views as uint8 NHWC tensors on the device. Nothing else runs,
so this is the loader's ceiling; `iecl profile` shows it in place. The timed
steps run in `--repeats` consecutive windows of `--steps`: images/s is the
median window's, with the windows' IQR and min-max (profiling/stats.py);
the step times' spread is over every timed step.

Two DALI variants answer how close the loader is to the decoder's own limit:
`--decode-only` times `DaliDecodeOnly`, the same reader, files, threads and
decoder (same options: `mixed`/nvJPEG on a GPU, `cpu` on a CPU) with no
crop, resize or colour work, so decoding's own images/s stands beside the
full loader's, and their ratio is the share of the loader's time per image
that decoding alone takes (`findings`). `--hw-decoder-load` times the loader
at several values of `dali.hw_decoder_load`, the share of each batch the
A100/H100/H200 hardware JPEG decoder takes: a GPU setting; DALI's cpu decoder
has no such option, so on a CPU one run stands for all and says so.
`--exec-dynamic` also times each DALI run with DALI's dynamic executor
(`dali.exec_dynamic=true`, shipped off): the same batches, scheduled by the
executor that may overlap CPU and GPU stages better.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from iecl.pipeline import (
    BatchPlan,
    DaliOptions,
    DataError,
    LoaderSpec,
    build_loader,
    open_images,
)
from iecl.pipeline.augment import get_recipe
from iecl.pipeline.sources import open_beton
from iecl.profiling import stats
from iecl.profiling.machine import versions


@dataclass
class LoaderResult:
    backend: str
    decode: str | None
    device: str
    batch_size: int
    image_size: int
    recipe: str
    images: int
    steps: int
    warmup_steps: int
    seconds: float
    img_per_s: float
    step_ms_median: float
    step_ms_p90: float
    cpu_threads: int
    workers: int
    peak_host_mb: float
    peak_gpu_mb: float | None
    bad_images: int
    repeats: int = 1
    img_per_s_stats: dict | None = None  # over the windows
    step_ms_stats: dict | None = None  # over every timed step
    label: str = ""  # "pil", "dali/shared", "dali/shared/decode-only", "dali/shared hw=0.9" (run_label)
    decode_only: bool = False  # dali: decoding alone (DaliDecodeOnly), no crop, resize or colour work
    decoder: str | None = None  # dali: "mixed" (nvJPEG, on a GPU) or "cpu" (libjpeg-turbo)
    hw_decoder_load: float | None = None  # what nvJPEG was given; None: no hardware decoder option (not on a GPU)
    exec_dynamic: bool = False  # dali: DALI's dynamic executor (dali.exec_dynamic)


#: the shipped dali.hw_decoder_load and dali.exec_dynamic (DaliOptions, train/config.py DaliConfig)
DEFAULT_HW_DECODER_LOAD = DaliOptions().hw_decoder_load
DEFAULT_EXEC_DYNAMIC = DaliOptions().exec_dynamic


def run_label(backend: str, decode: str | None = None, decode_only: bool = False,
              hw_decoder_load: float | None = None, exec_dynamic: bool = DEFAULT_EXEC_DYNAMIC) -> str:
    """A run's name in tables: "pil", "dali/shared", "dali/window/decode-only",
    " hw=0.9" after a DALI run whose hw_decoder_load is not the shipped one,
    " dynamic" (" static") where the executor is not the shipped one."""
    if backend != "dali":
        return backend
    name = f"dali/{decode}" + ("/decode-only" if decode_only else "")
    if hw_decoder_load is not None and hw_decoder_load != DEFAULT_HW_DECODER_LOAD:
        name += f" hw={hw_decoder_load:g}"
    if exec_dynamic != DEFAULT_EXEC_DYNAMIC:
        name += " dynamic" if exec_dynamic else " static"
    return name


class MemoryWatch:
    """Peak resident memory of this process tree, and peak used GPU memory above
    the level when watching started (sampled when `sample()` is called)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.gpu_base = self._gpu_used() if device.type == "cuda" else None
        self.peak_host, self.peak_gpu = 0, 0

    def _gpu_used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def sample(self) -> None:
        self.peak_host = max(self.peak_host, process_tree_rss())
        if self.gpu_base is not None:
            self.peak_gpu = max(self.peak_gpu, self._gpu_used() - self.gpu_base)


def process_tree_rss(pid: int | None = None) -> int:
    """Resident bytes of `pid` (default: this process) and all its descendants (Linux /proc)."""
    pid = pid or os.getpid()
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue  # the process ended while we looked
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(images, backend: str, decode: str, device: torch.device, args, progress: bool = False, *,
              decode_only: bool = False, hw_decoder_load: float | None = None,
              exec_dynamic: bool | None = None) -> LoaderResult:
    """`args.warmup` untimed steps, then `args.repeats` windows of `args.steps` timed ones.

    dali only: `decode_only` times `DaliDecodeOnly` (decoding alone) instead of
    the loader; `hw_decoder_load` replaces the shipped dali.hw_decoder_load
    (None: keep it); it reaches nvJPEG on a GPU and nothing on a CPU;
    `exec_dynamic` replaces the shipped dali.exec_dynamic (None: keep it)."""
    if backend != "dali" and (decode_only or hw_decoder_load is not None or exec_dynamic is not None):
        raise ValueError("decode_only, hw_decoder_load and exec_dynamic are DALI settings")
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    repeats = getattr(args, "repeats", 1)
    watch = MemoryWatch(device)
    plan = BatchPlan(get_recipe(args.recipe, None), args.batch_size, args.image_size, args.seed, workers, device)
    options = DaliOptions()
    if hw_decoder_load is not None:
        options = replace(options, hw_decoder_load=hw_decoder_load)
    if exec_dynamic is not None:
        options = replace(options, exec_dynamic=exec_dynamic)
    if decode_only:
        from iecl.pipeline.dali import DaliDecodeOnly

        loader = DaliDecodeOnly(images, plan, decode=decode, options=options)
    else:
        loader = build_loader(images, LoaderSpec(backend, plan, decode=decode, dali=options))
    gpu_decoder = backend == "dali" and device.type == "cuda"
    label = run_label(backend, decode, decode_only, options.hw_decoder_load if gpu_decoder else None,
                      options.exec_dynamic)
    needed = args.warmup + args.steps * repeats
    if needed > len(loader):
        # Several epochs are fine (a loader must sustain them); say how many.
        print(f"  note: {needed} steps span {needed / len(loader):.1f} epochs of {len(loader)} batches")
    from tqdm import tqdm

    bar = tqdm(total=needed, desc=label, unit="batch",
               disable=not progress, dynamic_ncols=True, mininterval=0.5, leave=False)
    try:
        times, windows, epoch = [], [], 0
        loader.set_epoch(epoch)
        it = iter(loader)
        start = None
        for step in range(needed):
            if step == args.warmup:
                _sync(device)
                start = last = window_start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                epoch += 1
                loader.set_epoch(epoch)
                it = iter(loader)
                batch = next(it)
            if step >= args.warmup:
                _sync(device)  # a batch counts when its tensors are really on the device
                now = time.perf_counter()
                times.append(now - last)
                last = now
                if (step - args.warmup + 1) % args.steps == 0:  # a window ends
                    windows.append(args.steps * args.batch_size / (now - window_start))
                    window_start = now
            watch.sample()
            bar.update()
            del batch
        seconds = time.perf_counter() - start
        bad = len(loader.bad_files)
    finally:
        bar.close()
        loader.close()
    rate = stats.summary(windows)
    ordered = sorted(times)
    return LoaderResult(
        backend=backend, decode=decode if backend == "dali" else None, device=str(device),
        batch_size=args.batch_size, image_size=args.image_size, recipe=args.recipe, images=len(images),
        steps=args.steps, warmup_steps=args.warmup, seconds=round(seconds, 4),
        img_per_s=round(rate["median"], 1),
        step_ms_median=round(1000 * ordered[len(ordered) // 2], 2),
        step_ms_p90=round(1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 2),
        cpu_threads=os.cpu_count() or 1, workers=workers,
        peak_host_mb=round(watch.peak_host / 2**20, 1),
        peak_gpu_mb=round(watch.peak_gpu / 2**20, 1) if device.type == "cuda" else None,
        bad_images=bad, repeats=repeats, img_per_s_stats=rate,
        step_ms_stats=stats.summary([1e3 * t for t in times]),
        label=label, decode_only=decode_only,
        decoder=("mixed" if gpu_decoder else "cpu") if backend == "dali" else None,
        hw_decoder_load=options.hw_decoder_load if gpu_decoder else None,
        exec_dynamic=options.exec_dynamic if backend == "dali" else False,
    )


def _rate(run: dict) -> dict:
    return stats.of(run.get("img_per_s_stats") or run["img_per_s"])


def findings(runs: list[dict]) -> dict:
    """What the DALI runs among `runs` (LoaderResult dicts) say together; each
    ratio with the interval the windows' min-max allow (stats.ratio) and
    whether it is beyond noise (None: too few windows to say):

    decode_modes     per hw_decoder_load both modes ran at: which of
                     decode=shared/window was faster, and by how much
                     (ratio: the winner's img/s over the loser's)
    decode_share     per decode-only run with its full loader (same decode
                     and hw_decoder_load): both img/s and `share`, the loader's
                     img/s over decoding's: the share of the loader's time per
                     image that decoding alone takes (DALI overlaps its stages,
                     so the rest is what the crop, resize, colour work and the
                     copy out add beyond the decode)
    hw_decoder_load  per decode mode timed at two or more values: img/s per
                     value, the fastest, and it over the shipped default
    executor         per run timed with both DALI executors (same decode,
                     hw_decoder_load, decode-only or not): the dynamic
                     executor's img/s over the static one's
    The first three compare runs with the shipped executor only.
    """
    dali = [r for r in runs if "error" not in r and r.get("backend") == "dali"]
    executors = [r for r in dali if bool(r.get("exec_dynamic")) != DEFAULT_EXEC_DYNAMIC]
    dali = [r for r in dali if bool(r.get("exec_dynamic")) == DEFAULT_EXEC_DYNAMIC]
    full = [r for r in dali if not r.get("decode_only")]
    out: dict = {"decode_modes": [], "decode_share": [], "hw_decoder_load": [], "executor": []}

    def find(rows, decode, hw):
        return next((r for r in rows if r["decode"] == decode and r.get("hw_decoder_load") == hw), None)

    for hw in dict.fromkeys(r.get("hw_decoder_load") for r in full):
        shared, window = find(full, "shared", hw), find(full, "window", hw)
        if shared and window:
            win, lose = (shared, window) if _rate(shared)["median"] >= _rate(window)["median"] else (window, shared)
            ratio = stats.ratio(_rate(win), _rate(lose))
            out["decode_modes"].append({
                "hw_decoder_load": hw, "winner": win["decode"], "loser": lose["decode"],
                "winner_img_per_s": _rate(win), "loser_img_per_s": _rate(lose), "ratio": ratio,
                "beyond_noise": stats.beyond(ratio, 1.0)})
    for only in (r for r in dali if r.get("decode_only")):
        loader = find(full, only["decode"], only.get("hw_decoder_load"))
        if loader:
            out["decode_share"].append({
                "decode": only["decode"], "hw_decoder_load": only.get("hw_decoder_load"), "decoder": only.get("decoder"),
                "decode_only_img_per_s": _rate(only), "loader_img_per_s": _rate(loader),
                "share": stats.ratio(_rate(loader), _rate(only))})
    for decode in dict.fromkeys(r["decode"] for r in full):
        swept = sorted((r for r in full if r["decode"] == decode and r.get("hw_decoder_load") is not None),
                       key=lambda r: r["hw_decoder_load"])
        if len({r["hw_decoder_load"] for r in swept}) < 2:
            continue
        best = max(swept, key=lambda r: _rate(r)["median"])
        default = next((r for r in swept if r["hw_decoder_load"] == DEFAULT_HW_DECODER_LOAD), None)
        row = {"decode": decode, "default": DEFAULT_HW_DECODER_LOAD, "best": best["hw_decoder_load"],
               "runs": [{"value": r["hw_decoder_load"], "img_per_s": _rate(r)} for r in swept]}
        if default is not None:
            row["best_over_default"] = ratio = stats.ratio(_rate(best), _rate(default))
            row["beyond_noise"] = stats.beyond(ratio, 1.0) if best is not default else False
        out["hw_decoder_load"].append(row)
    for other in executors:
        same = next((r for r in dali if (r["decode"], r.get("hw_decoder_load"), bool(r.get("decode_only"))) ==
                     (other["decode"], other.get("hw_decoder_load"), bool(other.get("decode_only")))), None)
        if same:
            dynamic, static = (other, same) if other.get("exec_dynamic") else (same, other)
            ratio = stats.ratio(_rate(dynamic), _rate(static))
            out["executor"].append({
                "label": other.get("label") or run_label("dali", other["decode"], bool(other.get("decode_only"))),
                "decode": other["decode"], "hw_decoder_load": other.get("hw_decoder_load"),
                "decode_only": bool(other.get("decode_only")), "dynamic_img_per_s": _rate(dynamic),
                "static_img_per_s": _rate(static), "ratio": ratio, "beyond_noise": stats.beyond(ratio, 1.0)})
    return {key: value for key, value in out.items() if value}


def findings_lines(found: dict) -> list[str]:
    """`findings` as plain sentences (the command's output; report.md words them alike)."""
    lines = []
    for row in found.get("decode_modes", []):
        at = "" if row["hw_decoder_load"] is None else f" (hw_decoder_load {row['hw_decoder_load']:g})"
        lines.append(f"decode: {row['winner']} beat {row['loser']}{at} by {stats.fmt_times(row['ratio'])}, "
                     f"{stats.fmt_verdict(row['beyond_noise'])}")
    for row in found.get("decode_share", []):
        share = row["share"]
        lines.append(f"decode alone ({row['decoder']} decoder, decode={row['decode']}): "
                     f"{row['decode_only_img_per_s']['median']:,.0f} img/s against the loader's "
                     f"{row['loader_img_per_s']['median']:,.0f}: decoding is {100 * share['value']:.0f}% "
                     f"({100 * share['low']:.0f}-{100 * share['high']:.0f}%) of the loader's time per image")
    for row in found.get("hw_decoder_load", []):
        rates = ", ".join(f"{r['value']:g}: {r['img_per_s']['median']:,.0f}" for r in row["runs"])
        line = f"hw_decoder_load (decode={row['decode']}), img/s: {rates}; fastest {row['best']:g}"
        if "best_over_default" in row:
            line += (f", {stats.fmt_times(row['best_over_default'])} the shipped {row['default']:g}, "
                     f"{stats.fmt_verdict(row['beyond_noise'])}")
        lines.append(line)
    for row in found.get("executor", []):
        lines.append(executor_sentence(row))
    return lines


def executor_sentence(row: dict) -> str:
    """One `findings.executor` row in words (the command's output and report.md)."""
    return (f"executor ({row['label']}): dynamic {row['dynamic_img_per_s']['median']:,.0f} img/s against static "
            f"{row['static_img_per_s']['median']:,.0f}: {stats.fmt_times(row['ratio'])}, "
            f"{stats.fmt_verdict(row['beyond_noise'])}")


def _beton_for(data: str, args) -> str:
    """A .beton for `data`: itself, or a cached conversion of the folder."""
    if data.endswith(".beton"):
        return data
    from iecl.pipeline.ffcv import convert

    key = hashlib.sha1(f"{os.path.abspath(data)}|{args.image_size}".encode()).hexdigest()[:12]
    beton = Path(args.beton or Path("~/.cache/iecl/bench").expanduser() / f"{Path(data).name}-{key}.beton")
    if not beton.exists():
        beton.parent.mkdir(parents=True, exist_ok=True)
        print(f"  converting {data} to {beton} once (timed separately, not part of the benchmark)")
        info = convert(open_images(data), beton, max_resolution=max(512, 2 * args.image_size),
                       workers=args.workers or os.cpu_count() or 1, progress=True)
        print(f"  converted {info['written']} images in {info['seconds']:.1f} s")
    return str(beton)


def main(args) -> int:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda but no CUDA device is available; use --device cpu")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        raise DataError("--steps, --repeats and --batch-size must be positive, --warmup 0 or more")
    decode_only = getattr(args, "decode_only", False)
    hw_values = list(getattr(args, "hw_decoder_load", None) or [None])
    executors = (None, not DEFAULT_EXEC_DYNAMIC) if getattr(args, "exec_dynamic", False) else (None,)
    if (decode_only or hw_values != [None] or len(executors) > 1) and "dali" not in args.backend:
        raise DataError("--decode-only, --hw-decoder-load and --exec-dynamic are DALI settings: add dali to --backend")
    if any(v is not None and not 0 <= v <= 1 for v in hw_values):
        raise DataError("--hw-decoder-load values are shares of a batch, in [0, 1]")
    if hw_values != [None] and device.type != "cuda":
        print(f"  note: --hw-decoder-load {' '.join(f'{v:g}' for v in hw_values)} does nothing on {device}: DALI's cpu "
              "decoder has no hardware JPEG decoder, so one run per decode mode stands for every value")
        hw_values = [None]
    results = []
    for backend in args.backend:
        images = open_beton(_beton_for(args.data, args)) if backend == "ffcv" else open_images(args.data)
        variants = [(d, hw, only, dyn) for d in args.decode for hw in hw_values
                    for only in ((False, True) if decode_only else (False,)) for dyn in executors] if (
                        backend == "dali") else [("shared", None, False, None)]
        for decode, hw, only, dyn in variants:
            label = run_label(backend, decode, only, hw, DEFAULT_EXEC_DYNAMIC if dyn is None else dyn)
            print(f"benchmarking {label} on {device}: {len(images)} images, batch {args.batch_size}, "
                  f"{args.image_size}px, {args.warmup} + {args.repeats} x {args.steps} steps", flush=True)
            results.append(bench_one(images, backend, decode, device, args, progress=not args.no_progress,
                                     decode_only=only, hw_decoder_load=hw, exec_dynamic=dyn))
    _print_table(results)
    found = findings([asdict(r) for r in results])
    for line in findings_lines(found):
        print(line)
    record = {**asdict(results[0]), "versions": versions()} if len(results) == 1 else {
        "runs": [asdict(r) for r in results], "findings": found, "versions": versions()}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _print_table(results: list[LoaderResult]) -> None:
    width = max(14, *(len(r.label or r.backend) + 2 for r in results))
    head = (f"{'backend':<{width}}{'device':<8}{'batch':>6}{'img/s':>10}{'min-max img/s':>22}{'step ms':>9}{'p90 ms':>9}"
            f"{'host MB':>9}{'GPU MB':>8}{'workers':>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        name = r.label or r.backend + (f"/{r.decode}" if r.decode else "")
        gpu = f"{r.peak_gpu_mb:.0f}" if r.peak_gpu_mb is not None else "-"
        rate = stats.of(r.img_per_s_stats or r.img_per_s)
        spread = f"{rate['min']:.1f}-{rate['max']:.1f}" if rate["n"] > 1 else "(one window)"
        print(f"{name:<{width}}{r.device:<8}{r.batch_size:>6}{r.img_per_s:>10.1f}{spread:>22}{r.step_ms_median:>9.1f}"
              f"{r.step_ms_p90:>9.1f}{r.peak_host_mb:>9.0f}{gpu:>8}{r.workers:>8}")
    repeats = {r.repeats for r in results}
    print(f"img/s: the median of {'/'.join(map(str, sorted(repeats)))} windows of {results[0].steps} steps, "
          "with their min-max; step ms: the median and 90th percentile of every timed step")
