"""`iecl compare`: the time of one ImageNet-1k epoch for every method, with
and without SAIB (the paper's Figures 7 and 8, measured).

For each (method, SAIB on/off) the step is built from the same config and
overrides as `iecl pretrain`, with the method's own hyperparameters,
spectral-norm choice and augmentation recipe (whatever the config set for its
own method; the user's overrides still apply to all); the batch, backbone,
image size, precision, compile setting, optimizer and projector sizes are the
config's, shared by all. Each is warmed up, then timed twice:

- **data on the device**: random uint8 views already on the device, so the
  loader costs nothing: the model-only ceiling;
- **real loader**: the configured backend delivering the views, as in training.

Each time is the wall clock of `--steps` consecutive steps, synchronised at
both ends, divided by the steps. An epoch is projected as

    steps per epoch = floor(images / batch)     (every loader drops the tail)
    epoch seconds   = steps per epoch x seconds per step

with images = 1,281,167 (ImageNet-1k train) unless --epoch-images says
otherwise. Loader efficiency is model-only step time over real-loader step
time (1.0: the loader hides completely behind the model). SAIB's added time is
(with - without) / without, per method.
"""

from __future__ import annotations

import gc
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from iecl.model.methods import METHODS as REGISTRY
from iecl.profiling.cli import IMAGENET_TRAIN_IMAGES
from iecl.profiling.harness import (
    batches,
    build_harness,
    compile_if_configured,
    load_resolved,
    resident_views,
    run_steps,
)
from iecl.profiling.machine import device_name, versions
from iecl.train.config import ConfigError, method_own_values

METHODS = tuple(REGISTRY)
SAIB_MODES = {"both": (False, True), "on": (True,), "off": (False,)}
PAPER_OVERHEAD = "the paper (Appendix D) reports 8.8% on average and 12.3% for SimCLR"


def steps_per_epoch(images: int, batch_size: int, world_size: int = 1) -> int:
    """Full global batches in one epoch (the partial last batch is dropped)."""
    return images // (batch_size * world_size)


def epoch_seconds(step_seconds: float, batch_size: int, images: int = IMAGENET_TRAIN_IMAGES, world_size: int = 1) -> float:
    return steps_per_epoch(images, batch_size, world_size) * step_seconds


def added_percent(without: float, with_saib: float) -> float:
    return 100.0 * (with_saib - without) / without


# ------------------------------------------------------------- measuring


def _timing(step_seconds: float, batch: int, images: int) -> dict:
    return {
        "step_ms": 1e3 * step_seconds,
        "img_per_s": batch / step_seconds,
        "epoch_seconds": epoch_seconds(step_seconds, batch, images),
    }


def measure(cfg, images, steps: int, warmup: int, epoch_images: int) -> dict:
    """One (method, SAIB) configuration: model-only, then (with `images`) the real loader."""
    h = build_harness(cfg, images, total_steps=max(2 * (warmup + steps), 1000))
    try:
        device, batch = h.device, cfg.train.batch_size
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        compile_if_configured(h)
        resident = itertools.cycle(resident_views(cfg, device))
        warm_s, _ = run_steps(h, resident, warmup)
        wall, _ = run_steps(h, resident, steps, first_step=warmup)
        row = {
            "method": cfg.method.name, "saib": cfg.saib.enabled, "warmup_seconds": warm_s,
            "model_only": _timing(wall / steps, batch, epoch_images),
        }
        if h.loader is not None:
            source = batches(h)
            run_steps(h, source, warmup, first_step=warmup + steps)  # loader start-up: workers, pipelines
            wall, _ = run_steps(h, source, steps, first_step=2 * warmup + steps)
            row["loader"] = _timing(wall / steps, batch, epoch_images)
            row["loader_efficiency"] = row["model_only"]["step_ms"] / row["loader"]["step_ms"]
        if device.type == "cuda":
            row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return row
    finally:
        h.close()
        del h
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compare(config: str | None, overrides: list[str], methods=METHODS, saib: str = "both", images=None,
            steps: int = 20, warmup: int = 5, epoch_images: int = IMAGENET_TRAIN_IMAGES, log=print,
            on_row=None) -> dict:
    """Every (method, SAIB) row and the SAIB overheads, as one JSON-serialisable
    dict. `on_row(result so far)` is called after each row (iecl report saves
    it, so that a run stopped by its time budget keeps the rows it finished)."""
    for text in overrides:
        if text.split("=", 1)[0].strip() in ("method.name", "saib.enabled"):
            raise ConfigError(f"{text}: iecl compare sets method.name and saib.enabled itself; "
                              "choose them with --methods and --saib")
    rows, cfg = [], None
    for method in methods:
        for enabled in SAIB_MODES[saib]:
            cfg = load_resolved(config, [*method_own_values(), *overrides, f"method.name={method}",
                                         f"saib.enabled={str(enabled).lower()}"])
            log(f"iecl compare: {method} {'+SAIB' if enabled else 'without SAIB'}")
            try:
                rows.append(measure(cfg, images, steps, warmup, epoch_images))
            except torch.cuda.OutOfMemoryError as err:  # one configuration too big: keep the others
                log(f"iecl compare: {method} {'+SAIB' if enabled else 'without SAIB'}: out of memory, skipped")
                rows.append({"method": method, "saib": enabled, "error": f"out of memory: {str(err).splitlines()[0]}"})
            if on_row is not None:
                on_row(_result(cfg, rows, images, steps, warmup, epoch_images))
    return _result(cfg, rows, images, steps, warmup, epoch_images)


def _result(cfg, rows: list[dict], images, steps: int, warmup: int, epoch_images: int) -> dict:
    t = cfg.train
    return {
        "backbone": cfg.model.backbone, "batch_size": t.batch_size, "image_size": cfg.data.image_size,
        "precision": t.precision, "channels_last": t.channels_last, "compile": t.compile,
        "saib_impl": cfg.kernels.saib_impl, "view_prep": cfg.kernels.view_prep,
        "loader": None if images is None else f"{cfg.data.backend} ({cfg.data.workers} workers, decode {cfg.data.decode})",
        "device": device_name(torch.device(t.device)), "versions": versions(),
        "steps": steps, "warmup": warmup, "epoch_images": epoch_images,
        "steps_per_epoch": steps_per_epoch(epoch_images, t.batch_size),
        "rows": rows, "saib_overhead": overheads(rows),
    }


def overheads(rows: list[dict]) -> dict:
    """SAIB's added time per method (percent of the method's step without
    SAIB), for each timing present in both rows, and their mean."""
    by = {(r["method"], r["saib"]): r for r in rows if "error" not in r}
    out: dict = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        off, on = by.get((method, False)), by.get((method, True))
        if off and on:
            out[method] = {kind: added_percent(off[kind]["step_ms"], on[kind]["step_ms"])
                           for kind in ("model_only", "loader") if kind in off and kind in on}
    if out:
        kinds = set.intersection(*(set(v) for v in out.values()))
        out["mean"] = {k: statistics.fmean(v[k] for v in out.values()) for k in kinds}
    return out


# ------------------------------------------------------------- writing


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def markdown(r: dict) -> str:
    loader = r["loader"] is not None
    lines = [
        (f"# iecl compare: {r['backbone']}, batch {r['batch_size']}, {r['image_size']} px, {r['precision']}"
        f"{', channels-last' if r['channels_last'] else ''}, compile {'on' if r['compile'] else 'off'}"),
        "",
        f"Device: {r['device']}. Software: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
        f"SAIB kernels: {r['saib_impl']}; view preparation: {r['view_prep']}; loader: {r['loader'] or 'not measured'}.",
        (f"Each time: {r['steps']} steps after {r['warmup']} warm-up, wall clock synchronised at both ends. "
        f"One epoch = {r['steps_per_epoch']:,} steps of {r['batch_size']} = floor({r['epoch_images']:,} / {r['batch_size']})."),
    ]
    if "command" in r:
        lines.append(f"Command: `{r['command']}`")
    head = "| method | SAIB | step ms (data on device) | img/s | epoch (data on device) |"
    rule = "| --- | --- | ---: | ---: | ---: |"
    if loader:
        head += " step ms (loader) | img/s | epoch (loader) | loader efficiency |"
        rule += " ---: | ---: | ---: | ---: |"
    lines += ["", "## Time per epoch", "", head, rule]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['method']} | {'yes' if row['saib'] else 'no'} | {row['error']} |")
            continue
        m = row["model_only"]
        line = (f"| {row['method']} | {'yes' if row['saib'] else 'no'} | {m['step_ms']:.1f} | {m['img_per_s']:.0f} | "
                f"{_minutes(m['epoch_seconds'])} |")
        if loader:
            d = row["loader"]
            line += (f" {d['step_ms']:.1f} | {d['img_per_s']:.0f} | {_minutes(d['epoch_seconds'])} | "
                     f"{100 * row['loader_efficiency']:.0f}% |")
        lines.append(line)
    if r["saib_overhead"]:
        lines += ["", "## SAIB's added time", "", "| method | added (data on device) |" + (" added (loader) |" if loader else ""),
                  "| --- | ---: |" + (" ---: |" if loader else "")]
        for method, v in r["saib_overhead"].items():
            line = f"| {method} | {v['model_only']:+.1f}% |"
            if loader:
                line += f" {v['loader']:+.1f}% |" if "loader" in v else " - |"
            lines.append(line)
        lines += ["", f"For comparison, {PAPER_OVERHEAD}."]
    return "\n".join(lines) + "\n"


def chart(r: dict, path: Path) -> None:
    """Two panels in the manner of the paper's Figures 7 and 8: minutes per
    epoch per method (without and with SAIB; real loader where measured, the
    model-only ceiling as outlines) and SAIB's added time in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(row["method"] for row in r["rows"]))
    by = {(row["method"], row["saib"]): row for row in r["rows"] if "error" not in row}
    kind = "loader" if r["loader"] is not None else "model_only"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.38
    for i, (enabled, colour, label) in enumerate(((False, "#4c72b0", "without SAIB"), (True, "#dd8452", "with SAIB"))):
        xs = [j + (i - 0.5) * width for j, m in enumerate(methods) if (m, enabled) in by]
        rows = [by[(m, enabled)] for m in methods if (m, enabled) in by]
        if not rows:
            continue
        left.bar(xs, [row[kind]["epoch_seconds"] / 60 for row in rows], width, color=colour, label=label)
        if kind == "loader":
            left.bar(xs, [row["model_only"]["epoch_seconds"] / 60 for row in rows], width, fill=False,
                     edgecolor="black", linewidth=0.8, label="data on device" if enabled else None)
    left.set_xticks(range(len(methods)), methods)
    left.set_ylabel("minutes per ImageNet-1k epoch")
    left.set_title(f"Time per epoch ({'real loader' if kind == 'loader' else 'data on device'})")
    left.legend(frameon=False)
    over = {m: v for m, v in r["saib_overhead"].items() if m != "mean" and kind in v}
    if over:
        bars = right.bar(list(over), [v[kind] for v in over.values()], color="#dd8452")
        right.bar_label(bars, fmt="%+.1f%%", padding=2)
        mean = r["saib_overhead"]["mean"][kind]
        right.axhline(mean, color="black", linestyle="--", linewidth=0.8, label=f"mean {mean:+.1f}%")
        right.legend(frameon=False)
    else:
        right.text(0.5, 0.5, "needs each method with and without SAIB", ha="center", va="center")
    right.set_ylabel("added time per epoch (%)")
    right.set_title("SAIB's added time")
    fig.suptitle(f"{r['device']}: {r['backbone']}, batch {r['batch_size']}, {r['image_size']} px, {r['precision']}, "
                 f"compile {'on' if r['compile'] else 'off'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(r: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "markdown": out / "compare.md", "chart": out / "compare.png"}
    paths["json"].write_text(json.dumps(r, indent=2) + "\n")
    paths["markdown"].write_text(markdown(r))
    chart(r, paths["chart"])
    return paths


def run_args(args) -> int:
    from iecl.train.data import resolve_images

    methods = args.methods or METHODS
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    images = None
    if not args.no_loader:
        cfg = load_resolved(args.config, args.overrides)
        images = resolve_images(cfg.data, progress=not args.no_progress)
    start = time.perf_counter()
    report = compare(args.config, args.overrides, methods, args.saib, images, args.steps, args.warmup,
                     args.epoch_images, log=lambda text: print(text, file=sys.stderr))
    report["command_seconds"] = time.perf_counter() - start
    report["command"] = " ".join(["iecl", *sys.argv[1:]])
    out = Path(args.out) if args.out else Path("runs") / f"compare-{report['backbone']}-b{report['batch_size']}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = write(report, out)
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
