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

Each time is measured in `--repeats` windows of `--steps` consecutive steps,
each window's wall clock synchronised at both ends and divided by its steps;
a row's time is the median window, with the IQR and min-max of the windows
(profiling/stats.py), and the chart's error bars are the min-max. An epoch is
projected as

    steps per epoch = floor(images / batch)     (every loader drops the tail)
    epoch seconds   = steps per epoch x seconds per step

with images = 1,281,167 (ImageNet-1k train) unless --epoch-images says
otherwise. Loader efficiency is model-only step time over real-loader step
time (1.0: the loader hides completely behind the model). SAIB's added time is
(with - without) / without, per method. Both come with the interval the two
timings' ranges allow; a difference inside it is printed as "within noise",
and what cannot be true beyond noise (a loader faster than data on the device,
SAIB making a step faster) is flagged (profiling/checks.py).
"""

from __future__ import annotations

import gc
import itertools
import json
import sys
import textwrap
import time
from pathlib import Path

import torch

from iecl.model.methods import METHODS as REGISTRY
from iecl.profiling import checks, stats
from iecl.profiling.choices import IMAGENET_TRAIN_IMAGES
from iecl.profiling.harness import (
    batches,
    build_harness,
    compile_if_configured,
    load_resolved,
    progress_bar,
    resident_views,
    run_steps,
    run_windows,
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


def _timing(window_seconds: list[float], batch: int, images: int) -> dict:
    """A timing from its windows' seconds per step: the median's figures, and the spread."""
    step = stats.summary([1e3 * w for w in window_seconds])
    return {
        "step_ms": step["median"],
        "img_per_s": 1e3 * batch / step["median"],
        "epoch_seconds": epoch_seconds(step["median"] / 1e3, batch, images),
        "step_ms_stats": step,
    }


def _step_stats(timing: dict) -> dict:
    """A timing's step-ms summary (an older record without one: its one figure)."""
    return timing.get("step_ms_stats") or stats.of(timing["step_ms"])


def measure(cfg, images, steps: int, warmup: int, epoch_images: int, repeats: int = 1, progress: bool = False) -> dict:
    """One (method, SAIB) configuration: model-only, then (with `images`) the real loader."""
    h = build_harness(cfg, images, total_steps=max(2 * (warmup + steps * repeats), 1000))
    kinds = 2 if h.loader is not None else 1
    label = f"{cfg.method.name} {'+SAIB' if cfg.saib.enabled else 'without SAIB'}"
    bar = progress_bar(kinds * (warmup + steps * repeats), label, progress)
    try:
        device, batch = h.device, cfg.train.batch_size
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        compile_if_configured(h)
        resident = itertools.cycle(resident_views(cfg, device))
        bar.set_postfix_str("data on the device: warm-up")
        warm_s, _ = run_steps(h, resident, warmup, on_step=bar.update)
        bar.set_postfix_str("data on the device")
        windows, _ = run_windows(h, resident, steps, repeats, first_step=warmup, on_step=bar.update)
        row = {
            "method": cfg.method.name, "saib": cfg.saib.enabled, "warmup_seconds": warm_s,
            "model_only": _timing(windows, batch, epoch_images),
        }
        if h.loader is not None:
            source = batches(h)
            first = warmup + steps * repeats
            bar.set_postfix_str("real loader: warm-up")
            run_steps(h, source, warmup, first_step=first, on_step=bar.update)  # loader start-up: workers, pipelines
            bar.set_postfix_str("real loader")
            windows, _ = run_windows(h, source, steps, repeats, first_step=first + warmup, on_step=bar.update)
            row["loader"] = _timing(windows, batch, epoch_images)
            efficiency = stats.ratio(row["model_only"]["step_ms_stats"], row["loader"]["step_ms_stats"])
            row["loader_efficiency"] = efficiency["value"]
            row["loader_efficiency_interval"] = efficiency
        if device.type == "cuda":
            row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return row
    finally:
        bar.close()
        h.close()
        del h
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compare(config: str | None, overrides: list[str], methods=METHODS, saib: str = "both", images=None,
            steps: int = 10, warmup: int = 5, epoch_images: int = IMAGENET_TRAIN_IMAGES, log=print,
            on_row=None, repeats: int = 3, progress: bool = False) -> dict:
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
            try:
                rows.append(measure(cfg, images, steps, warmup, epoch_images, repeats, progress))
                log(f"iecl compare: {_row_line(rows[-1])}")
            except torch.cuda.OutOfMemoryError as err:  # one configuration too big: keep the others
                log(f"iecl compare: {method} {'+SAIB' if enabled else 'without SAIB'}: out of memory, skipped")
                rows.append({"method": method, "saib": enabled, "error": f"out of memory: {str(err).splitlines()[0]}"})
            if on_row is not None:
                on_row(_result(cfg, rows, images, steps, warmup, epoch_images, repeats))
    return _result(cfg, rows, images, steps, warmup, epoch_images, repeats)


def _row_line(row: dict) -> str:
    """One finished configuration, for the log."""
    text = f"{row['method']} {'+SAIB' if row['saib'] else 'without SAIB'}: data on the device {stats.fmt(row['model_only']['step_ms_stats'])} ms"
    if "loader" in row:
        text += f"; real loader {stats.fmt(row['loader']['step_ms_stats'])} ms"
    return text


def _result(cfg, rows: list[dict], images, steps: int, warmup: int, epoch_images: int, repeats: int = 1) -> dict:
    t = cfg.train
    return {
        "backbone": cfg.model.backbone, "batch_size": t.batch_size, "image_size": cfg.data.image_size,
        "precision": t.precision, "channels_last": t.channels_last, "compile": t.compile,
        "saib_impl": cfg.kernels.saib_impl, "view_prep": cfg.kernels.view_prep,
        "loader": None if images is None else f"{cfg.data.backend} ({cfg.data.workers} workers, decode {cfg.data.decode})",
        "device": device_name(torch.device(t.device)), "versions": versions(),
        "steps": steps, "warmup": warmup, "repeats": repeats, "epoch_images": epoch_images,
        "steps_per_epoch": steps_per_epoch(epoch_images, t.batch_size),
        "rows": rows, "saib_overhead": overheads(rows), "flags": sanity_flags(rows),
        "noise_floor": NOISE_FLOOR,
    }


NOISE_FLOOR = ("a difference is beyond noise only when the min-max ranges of the two timings' windows do not "
               f"overlap; a smaller one is printed as within noise (with fewer than {stats.MIN_WINDOWS} windows: "
               "not known)")


def overheads(rows: list[dict]) -> dict:
    """SAIB's added time per method (percent of the method's step without
    SAIB), for each timing present in both rows, and their mean: each a
    `stats.change_percent` interval (value, low, high, n)."""
    by = {(r["method"], r["saib"]): r for r in rows if "error" not in r}
    out: dict = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        off, on = by.get((method, False)), by.get((method, True))
        if off and on:
            out[method] = {kind: stats.change_percent(_step_stats(off[kind]), _step_stats(on[kind]))
                           for kind in ("model_only", "loader") if kind in off and kind in on}
    if out:
        kinds = set.intersection(*(set(v) for v in out.values()))
        out["mean"] = {k: stats.mean_interval([v[k] for v in out.values()]) for k in kinds}
    return out


def sanity_flags(rows: list[dict]) -> list[dict]:
    """What cannot be true beyond noise: a loader faster than data on the device, SAIB making a step faster."""
    flags = []
    by = {(r["method"], r["saib"]): r for r in rows if "error" not in r}
    for (method, saib), row in by.items():
        if "loader" in row:
            subject = f"{method} {'+SAIB' if saib else 'without SAIB'}"
            flags.append(checks.loader_faster_than_model(subject, _step_stats(row["model_only"]), _step_stats(row["loader"])))
    for method in dict.fromkeys(m for m, _ in by):
        off, on = by.get((method, False)), by.get((method, True))
        for kind in ("model_only", "loader"):
            if off and on and kind in off and kind in on:
                where = "data on the device" if kind == "model_only" else "real loader"
                flags.append(checks.negative_overhead(f"{method}, {where}", _step_stats(off[kind]), _step_stats(on[kind])))
    return [f for f in flags if f is not None]


# ------------------------------------------------------------- writing


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _windows_text(r: dict) -> str:
    repeats = r.get("repeats", 1)
    return (f"median of {repeats} window{'s' if repeats != 1 else ''} of {r['steps']} steps, after {r['warmup']} "
            "warm-up")


def _timing_cells(t: dict) -> str:
    """step ms median (min-max) | img/s | epoch minutes (min-max)."""
    return f"{stats.fmt_short(_step_stats(t))} | {t['img_per_s']:,.0f} | {stats.fmt_short(_epoch_minutes(t))} min"


def _efficiency(row: dict) -> dict:
    return row.get("loader_efficiency_interval") or stats.ratio(_step_stats(row["model_only"]), _step_stats(row["loader"]))


def markdown(r: dict) -> str:
    loader = r["loader"] is not None
    lines = [
        (f"# iecl compare: {r['backbone']}, batch {r['batch_size']}, {r['image_size']} px, {r['precision']}"
        f"{', channels-last' if r['channels_last'] else ''}, compile {'on' if r['compile'] else 'off'}"),
        "",
        f"Device: {r['device']}. Software: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
        f"SAIB kernels: {r['saib_impl']}; view preparation: {r['view_prep']}; loader: {r['loader'] or 'not measured'}.",
        (f"Each time: the {_windows_text(r)}, each window's wall clock synchronised at both ends; in brackets the "
         f"min-max of the windows (the JSON has their IQR and every window). "
         f"One epoch = {r['steps_per_epoch']:,} steps of {r['batch_size']} = floor({r['epoch_images']:,} / {r['batch_size']})."),
        f"Noise floor: {r.get('noise_floor', NOISE_FLOOR)}.",
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
        line = f"| {row['method']} | {'yes' if row['saib'] else 'no'} | {_timing_cells(row['model_only'])} |"
        if loader:
            line += f" {_timing_cells(row['loader'])} | {stats.fmt_ratio_percent(_efficiency(row))} |"
        lines.append(line)
    if r["saib_overhead"]:
        lines += ["", "## SAIB's added time", "", "| method | added (data on device) |" + (" added (loader) |" if loader else ""),
                  "| --- | ---: |" + (" ---: |" if loader else "")]
        for method, v in r["saib_overhead"].items():
            line = f"| {method} | {stats.fmt_change(v['model_only'])} |"
            if loader:
                line += f" {stats.fmt_change(v['loader'])} |" if "loader" in v else " - |"
            lines.append(line)
        lines += ["", f"For comparison, {PAPER_OVERHEAD}."]
    if r.get("flags"):
        lines += ["", "## Checks", "", *checks.lines(r["flags"])]
    return "\n".join(lines) + "\n"


def figure(r: dict):
    """Two panels in the manner of the paper's Figures 7 and 8: minutes per
    epoch per method (without and with SAIB; real loader where measured, the
    model-only ceiling as outlines) and SAIB's added time in percent; error
    bars are the windows' min-max. Every label is kept inside its panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(row["method"] for row in r["rows"]))
    by = {(row["method"], row["saib"]): row for row in r["rows"] if "error" not in row}
    kind = "loader" if r["loader"] is not None else "model_only"
    # constrained layout keeps the title, the caption and every axis label inside the figure
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]}, layout="constrained")
    width, top = 0.38, 0.0
    for i, (enabled, colour, label) in enumerate(((False, "#4c72b0", "without SAIB"), (True, "#dd8452", "with SAIB"))):
        xs = [j + (i - 0.5) * width for j, m in enumerate(methods) if (m, enabled) in by]
        rows = [by[(m, enabled)] for m in methods if (m, enabled) in by]
        if not rows:
            continue
        minutes = [_epoch_minutes(row[kind]) for row in rows]
        top = max(top, *(m["max"] for m in minutes), *(_epoch_minutes(row["model_only"])["median"] for row in rows))
        left.bar(xs, [m["median"] for m in minutes], width, color=colour, label=label,
                 yerr=_error_bars(minutes), capsize=3, ecolor="black")
        if kind == "loader":
            left.bar(xs, [_epoch_minutes(row["model_only"])["median"] for row in rows], width, fill=False,
                     edgecolor="black", linewidth=0.8, label="data on device" if enabled else None)
    left.set_xticks(range(len(methods)), methods)
    left.set_ylabel("minutes per ImageNet-1k epoch")
    left.set_title(f"Time per epoch ({'real loader' if kind == 'loader' else 'data on device'})")
    left.legend(frameon=False)
    _headroom(left, 0.0, top)
    over = {m: v[kind] for m, v in r["saib_overhead"].items() if m != "mean" and kind in v}
    if over:
        values = [v["value"] for v in over.values()]
        errors = [[max(0.0, v["value"] - v["low"]) for v in over.values()], [max(0.0, v["high"] - v["value"]) for v in over.values()]]
        right.bar(list(over), values, color="#dd8452", yerr=errors, capsize=3, ecolor="black")
        for x, v in enumerate(over.values()):  # each label beyond its error bar, on the bar's side of zero
            up = v["value"] >= 0
            noise = "\nwithin noise" if stats.beyond(v, 0.0) is False else ""
            right.annotate(f"{v['value']:+.1f}%{noise}", (x, v["high"] if up else v["low"]), xytext=(0, 3 if up else -3),
                           textcoords="offset points", ha="center", va="bottom" if up else "top", fontsize=8)
        mean = r["saib_overhead"]["mean"][kind]["value"]
        right.axhline(mean, color="black", linestyle="--", linewidth=0.8, label=f"mean {mean:+.1f}%")
        right.axhline(0.0, color="grey", linewidth=0.6)
        right.legend(frameon=False, loc="best")
        _headroom(right, min(0.0, *(v["low"] for v in over.values())), max(0.0, *(v["high"] for v in over.values())))
    else:
        right.text(0.5, 0.5, "needs each method with and without SAIB", ha="center", va="center")
    right.set_ylabel("added time per epoch (%)")
    right.set_title("SAIB's added time")
    title = (f"{r['device']}: {r['backbone']}, batch {r['batch_size']}, {r['image_size']} px, {r['precision']}, "
             f"compile {'on' if r['compile'] else 'off'}")
    fig.suptitle(textwrap.fill(title, 130), fontsize=10)
    fig.supxlabel(textwrap.fill(f"Bars: the {_windows_text(r)}; error bars: min-max of the windows (on the filled bars; "
                                "SAIB's added time: the interval the two timings allow).", 170), fontsize=8)
    return fig


def _epoch_minutes(t: dict) -> dict:
    """A timing's epoch minutes per window (the projection scales with the step)."""
    step = _step_stats(t)
    return stats.mapped(step, lambda ms: t["epoch_seconds"] / 60 * ms / step["median"])


def _error_bars(summaries: list[dict]) -> list[list[float]]:
    below, above = zip(*(stats.error_bar(s) for s in summaries))
    return [list(below), list(above)]


def _headroom(ax, low: float, high: float) -> None:
    """Y limits with room for the value labels beyond the bars' ends (a label
    never leaves its panel, however extreme the value)."""
    span = (high - low) or 1.0
    ax.set_ylim(low - (0.25 * span if low < 0 else 0.0), high + 0.25 * span)


def chart(r: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(r)
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
                     args.epoch_images, log=lambda text: print(text, file=sys.stderr), repeats=args.repeats,
                     progress=not args.no_progress)
    report["command_seconds"] = time.perf_counter() - start
    report["command"] = " ".join(["iecl", *sys.argv[1:]])
    out = Path(args.out) if args.out else Path("runs") / f"compare-{report['backbone']}-b{report['batch_size']}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = write(report, out)
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
