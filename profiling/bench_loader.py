"""`iecl bench loader`: loader-only throughput of each backend.

What is timed is what training waits for: from asking the loader for a batch
to having both views as uint8 NHWC tensors on the device. Nothing else runs,
so this is the loader's ceiling; `iecl profile` shows it in place. The timed
steps run in `--repeats` consecutive windows of `--steps`: images/s is the
median window's, with the windows' IQR and min-max (profiling/stats.py);
the step times' spread is over every timed step.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from iecl.pipeline import BatchPlan, DataError, LoaderSpec, build_loader, open_images
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


def bench_one(images, backend: str, decode: str, device: torch.device, args, progress: bool = False) -> LoaderResult:
    """`args.warmup` untimed steps, then `args.repeats` windows of `args.steps` timed ones."""
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    repeats = getattr(args, "repeats", 1)
    watch = MemoryWatch(device)
    plan = BatchPlan(get_recipe(args.recipe, None), args.batch_size, args.image_size, args.seed, workers, device)
    loader = build_loader(images, LoaderSpec(backend, plan, decode=decode))
    needed = args.warmup + args.steps * repeats
    if needed > len(loader):
        # Several epochs are fine (a loader must sustain them); say how many.
        print(f"  note: {needed} steps span {needed / len(loader):.1f} epochs of {len(loader)} batches")
    from tqdm import tqdm

    bar = tqdm(total=needed, desc=backend + (f"/{decode}" if backend == "dali" else ""), unit="batch",
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
    )


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
    results = []
    for backend in args.backend:
        images = open_beton(_beton_for(args.data, args)) if backend == "ffcv" else open_images(args.data)
        for decode in args.decode if backend == "dali" else ["shared"]:
            label = backend + (f"/{decode}" if backend == "dali" else "")
            print(f"benchmarking {label} on {device}: {len(images)} images, batch {args.batch_size}, "
                  f"{args.image_size}px, {args.warmup} + {args.repeats} x {args.steps} steps", flush=True)
            results.append(bench_one(images, backend, decode, device, args, progress=not args.no_progress))
    _print_table(results)
    record = {**asdict(results[0]), "versions": versions()} if len(results) == 1 else {
        "runs": [asdict(r) for r in results], "versions": versions()}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _print_table(results: list[LoaderResult]) -> None:
    head = (f"{'backend':<14}{'device':<8}{'batch':>6}{'img/s':>10}{'min-max img/s':>22}{'step ms':>9}{'p90 ms':>9}"
            f"{'host MB':>9}{'GPU MB':>8}{'workers':>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        name = r.backend + (f"/{r.decode}" if r.decode else "")
        gpu = f"{r.peak_gpu_mb:.0f}" if r.peak_gpu_mb is not None else "-"
        rate = stats.of(r.img_per_s_stats or r.img_per_s)
        spread = f"{rate['min']:.1f}-{rate['max']:.1f}" if rate["n"] > 1 else "(one window)"
        print(f"{name:<14}{r.device:<8}{r.batch_size:>6}{r.img_per_s:>10.1f}{spread:>22}{r.step_ms_median:>9.1f}"
              f"{r.step_ms_p90:>9.1f}{r.peak_host_mb:>9.0f}{gpu:>8}{r.workers:>8}")
    repeats = {r.repeats for r in results}
    print(f"img/s: the median of {'/'.join(map(str, sorted(repeats)))} windows of {results[0].steps} steps, "
          "with their min-max; step ms: the median and 90th percentile of every timed step")
