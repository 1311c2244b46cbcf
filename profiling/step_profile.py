"""`iecl profile`: where one training step's time goes.

Two measurements of the same stages (profiling/harness.py STAGES):

- **in place**: `--repeats` windows of `--steps` real steps, marked between stages with CUDA events
  (a CPU clock on a CPU) while the host runs ahead as in training. A stage's
  time is the device timeline between its marks, so a device left idle (data
  not there yet, the per-step non-finite check draining the queue) is charged
  to the stage that ends the gap. The stages add up to the step; each window
  is also measured by the wall clock (synchronised at both ends), and the
  report shows the two side by side, per window.
- **isolated**: each stage run alone, synchronised before and after, median
  of `--isolate-iters`: the loader alone (time per batch with no model
  running), the view preparation, SAIB forward, each encoder's forward, the
  backward (split at SAIB as in place), the optimizer, the momentum update;
  and the whole step with the data already on the device (the model-only
  ceiling). "Heads and loss" and the sync exist only in place.

Every time is a median with its spread (profiling/stats.py: the windows for
the wall clock, the steps for a stage in place, the runs for a stage alone).
What cannot be true is flagged (profiling/checks.py): stages that add up to
more (or far less) than the step, a real loader faster than the data already
on the device, in-place and isolated times 2x apart.

The step's FLOP are counted once by `torch.utils.flop_counter` (convolutions
and matrix products, forward and backward; the optimizer's and other
elementwise work is not counted) and divided by the step time, next to the
bf16 matrix-multiply rate measured on this machine in the same run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from iecl.model.spectral import once_per_step
from iecl.profiling import checks, stats
from iecl.profiling.bench_saib import matmul_tflops
from iecl.profiling.harness import (
    STAGES,
    Harness,
    batches,
    build_harness,
    compile_if_configured,
    describe,
    progress_bar,
    resident_views,
    run_steps,
    run_windows,
    step_flop,
    synchronize,
)
from iecl.profiling.machine import device_name, versions


def profile(cfg, images, steps: int = 10, warmup: int = 5, isolate_iters: int = 10,
            trace: str | None = None, trace_steps: int = 3, log=print, repeats: int = 3, progress: bool = False) -> dict:
    """The whole report as one JSON-serialisable dict. `images=None`: data
    resident on the device (the data stage is then only the host's hand-over)."""
    # The schedule's length: long enough that the profiled steps stay near its start.
    h = build_harness(cfg, images, total_steps=max(warmup + 2 * steps * repeats + trace_steps + 1, 1000))
    try:
        return _profile(h, cfg, steps, warmup, repeats, isolate_iters, trace, trace_steps, log, progress)
    finally:
        h.close()


def _profile(h: Harness, cfg, steps, warmup, repeats, isolate_iters, trace, trace_steps, log, progress) -> dict:
    views = resident_views(cfg, h.device)
    flop = step_flop(h, *views[0])
    compile_if_configured(h)
    source = batches(h, views)
    log(f"iecl profile: {describe(cfg)}; warming up ({warmup} steps{', compiling' if cfg.train.compile else ''})")
    with progress_bar(warmup + 2 * steps * repeats, "profile", progress) as bar:  # updates never synchronise
        warm_s, _ = run_steps(h, source, warmup, on_step=bar.update)
        log(f"iecl profile: timing {repeats} windows of {steps} steps in place")
        windows, marked = run_windows(h, source, steps, repeats, first_step=warmup, laps=True, on_step=bar.update)
        log(f"iecl profile: timing {repeats} windows of {steps} steps with the data on the device")
        model_windows, _ = run_windows(h, itertools.cycle(views), steps, repeats, first_step=warmup + steps * repeats,
                                       on_step=bar.update)
    isolated = {}  # --isolate-iters 0: in place only
    if isolate_iters > 0:
        log(f"iecl profile: timing each stage alone ({isolate_iters} times)")
        isolated = isolate(h, views, source if h.loader is not None else None, isolate_iters)
    peak = matmul_tflops(h.device, iters=10, warmup=3)
    report = _report(cfg, h, marked, windows, model_windows, isolated, flop, peak, warm_s)
    report.update(steps=steps, warmup=warmup, repeats=repeats, isolate_iters=isolate_iters)
    if trace:
        report["trace"] = write_trace(h, source, trace, trace_steps, warmup + 2 * steps * repeats)
    return report


# ------------------------------------------------------------- isolation


def _timed_alone(h: Harness, fn, iters: int, setup=None) -> dict[str, dict]:
    """Seconds per stage (and "total") of `fn(setup())` run alone, synchronised
    before each run: a `stats.summary` over the runs for each."""
    runs = []
    for _ in range(iters):
        state = setup() if setup is not None else None
        synchronize(h.device)
        h.laps.begin()
        fn(state)
        h.laps.lap("_rest")
        h.laps.end_step()
        stages = h.laps.finish()[0]
        stages["total"] = sum(stages.values())
        runs.append(stages)
    keys = set().union(*runs)
    return {k: stats.summary([r.get(k, 0.0) for r in runs]) for k in keys}


def isolate(h: Harness, views, source, iters: int) -> dict[str, dict]:
    """Seconds of each stage run alone (a summary over `iters` runs); see the module docstring."""
    m, step, (a_u8, q_u8) = h.method, h.step, views[0]
    out: dict[str, dict] = {}
    if source is not None:
        out["data"] = _timed_alone(h, lambda _: next(source), iters)["total"]
    if m.saib is not None:
        out["view_prep"] = _timed_alone(h, lambda _: m.prepare(a_u8), iters)["total"]
        out["saib_fwd"] = _timed_alone(h, lambda _: _saib_forward(h, q_u8), iters)["total"]
    else:
        out["view_prep"] = _timed_alone(h, lambda _: (m.prepare(a_u8), m.prepare(q_u8)), iters)["total"]
    anchor, query = m.prepare(a_u8), m.prepare(q_u8)
    for role, encoder in m.encoders().items():
        stage = f"{role}_fwd"
        grad = torch.enable_grad() if role == "online" else torch.no_grad()
        out[stage] = _timed_alone(h, lambda _, e=encoder, g=grad: _two_forwards(h, e, g, anchor, query), iters)[stage]

    def forward(_=None):
        return step.forward(a_u8, q_u8, 0)[0]

    none = stats.summary([0.0] * iters)
    backward = _timed_alone(h, lambda losses: step.backward(losses), iters, setup=forward)
    out["backward"] = backward.get("backward", none)
    if m.saib is not None:
        out["saib_bwd"] = backward.get("saib_bwd", none)
    optimizer = _timed_alone(h, lambda _: step.update(0), iters, setup=lambda: step.backward(forward()))
    out["optimizer"], out["momentum"] = optimizer["optimizer"], optimizer["momentum"]
    return out


def _saib_forward(h: Harness, query_u8) -> None:
    with h.step.autocast():  # as in the step: the kernels' tiles are chosen for the autocast dtype
        h.method.saib(query_u8, h.method.prepare)


def _two_forwards(h: Harness, encoder, grad_mode, anchor, query) -> None:
    with h.step.autocast(), grad_mode, once_per_step():  # W / sigma once, as in the step
        encoder(anchor, query)


# ------------------------------------------------------------- trace


def write_trace(h: Harness, source, path: str, steps: int, first_step: int) -> dict:
    """`steps` more steps under torch.profiler: a Chrome/Perfetto trace at
    `path` (gzip-compressed when it ends in .gz) and the top operators."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if h.device.type == "cuda" else [])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _without_kineto_markers(), torch_profile(activities=activities) as prof:
        for i in range(steps):
            with record_function(f"iecl_step_{first_step + i}"):
                anchor, query = next(source)
                h.step(anchor, query, first_step + i)
        synchronize(h.device)
    prof.export_chrome_trace(path)
    sort = "self_cuda_time_total" if h.device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort, row_limit=15)
    except (AttributeError, KeyError):  # newer torch names the device column differently
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=15)
    return {"path": path, "steps": steps, "top_ops": table}


#: what Kineto (torch.profiler's C++ side) writes to stderr at every start and
#: stop: "USDT:<time> <pid>:<tid> SyncActivityProfilerHandler.cpp:52] profiler_start".
#: USDT is a log level of its own, ranked above ERROR, so no KINETO_LOG_LEVEL
#: hides it without hiding Kineto's errors too; the lines are filtered instead.
KINETO_MARKER = "USDT:"


@contextlib.contextmanager
def _without_kineto_markers():
    """File descriptor 2 (where C++ writes) into a temporary file while the
    profiler starts, runs and stops; then everything in it except Kineto's
    USDT marker lines is written to stderr as it came."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith(KINETO_MARKER)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


# ------------------------------------------------------------- report


def _report(cfg, h: Harness, marked: list[list[dict]], windows: list[float], model_windows: list[float],
            isolated: dict, flop, peak, warm_s) -> dict:
    """`marked`: per window, per step, seconds per stage; `windows`,
    `model_windows`: seconds per step of each window (in place, data on the device)."""
    per_step = [step for window in marked for step in window]
    present = [s for s in STAGES if any(s in step for step in per_step)]
    mean = {s: statistics.fmean(step.get(s, 0.0) for step in per_step) for s in present}
    parts = sum(mean.values())
    wall, model = stats.summary([1e3 * w for w in windows]), stats.summary([1e3 * w for w in model_windows])
    # per window: the stages' total against the same window's wall clock
    parts_over_wall = stats.summary([sum(sum(step.values()) for step in window) / (w * len(window))
                                     for window, w in zip(marked, windows)])
    batch = cfg.train.batch_size
    stages = {}
    for s in present:
        in_place = stats.summary([1e3 * step.get(s, 0.0) for step in per_step])
        alone = stats.mapped(isolated[s], lambda x: 1e3 * x) if s in isolated else None
        stages[s] = {
            "label": STAGES[s],
            "in_place_ms": 1e3 * mean[s],  # the mean: the shares add up to the step
            "in_place_median_ms": in_place["median"],
            "in_place_ms_stats": in_place,
            "share": mean[s] / parts if parts else 0.0,
            "isolated_ms": alone["median"] if alone else None,
            "isolated_ms_stats": alone,
        }
    saib = mean.get("saib_fwd", 0.0) + mean.get("saib_bwd", 0.0)
    isolated_model = sum(v["median"] for k, v in isolated.items() if k != "data")
    wall_s, model_s = wall["median"] / 1e3, model["median"] / 1e3
    report = {
        "config": describe(cfg),
        "method": cfg.method.name, "backbone": cfg.model.backbone, "saib": cfg.saib.enabled,
        "batch_size": batch, "image_size": cfg.data.image_size, "precision": cfg.train.precision,
        "compile": cfg.train.compile, "saib_impl": cfg.kernels.saib_impl, "view_prep": cfg.kernels.view_prep,
        "data": "resident on the device" if h.loader is None else f"{cfg.data.backend} loader ({cfg.data.workers} workers)",
        "device": device_name(h.device), "versions": versions(),
        "stages": stages,
        "step_ms": {
            "sum_of_parts": 1e3 * parts,
            "wall_clock": wall["median"],
            "model_only": model["median"],
            "isolated_sum_without_data": 1e3 * isolated_model,
        },
        "step_ms_stats": {"wall_clock": wall, "model_only": model},
        "parts_over_wall_clock": parts / wall_s,
        "parts_over_wall_clock_stats": parts_over_wall,
        "img_per_s": {"in_place": batch / wall_s, "model_only": batch / model_s},
        "saib_share": saib / parts if parts else 0.0,
        "flop_per_step": flop,
        "tflops": {"in_place": flop / wall_s / 1e12, "model_only": flop / model_s / 1e12},
        "matmul_bf16_tflops": peak,
        "share_of_matmul": {"in_place": flop / wall_s / 1e12 / peak, "model_only": flop / model_s / 1e12 / peak},
        "warmup_seconds": warm_s,
    }
    if h.loader is not None:
        report["loader_efficiency"] = stats.ratio(model, wall)
    report["flags"] = sanity_flags(report)
    return report


def sanity_flags(r: dict) -> list[dict]:
    """profiling/checks.py's verdicts on one profile."""
    subject = f"{r['method']} {r['backbone']}{' +SAIB' if r['saib'] else ''} ({r['data']})"
    found = [checks.parts_add_up(subject, r["parts_over_wall_clock_stats"]),
             checks.isolated_disagrees(subject, r["stages"]),
             checks.faster_than_matmul(subject, r["share_of_matmul"]["model_only"], r["device"])]
    if "loader_efficiency" in r:
        found.append(checks.loader_faster_than_model(subject, r["step_ms_stats"]["model_only"],
                                                     r["step_ms_stats"]["wall_clock"]))
    return [f for f in found if f is not None]


def format_report(r: dict) -> str:
    repeats = r.get("repeats", 1)
    lines = [
        f"iecl profile: {r['config']}",
        (f"  device {r['device']}; data {r['data']}; {repeats} window(s) of {r['steps']} steps after {r['warmup']} "
         f"warm-up ({r['warmup_seconds']:.1f} s); isolated: "
         + (f"median of {r['isolate_iters']} runs" if r["isolate_iters"] else "not measured (--isolate-iters 0)")),
        "",
        f"  {'stage':<28} {'in place ms':>12} {'share':>7} {'median (IQR) per step':>24} {'isolated ms (min-max)':>24}",
    ]
    for s in r["stages"].values():
        st = stats.of(s.get("in_place_ms_stats") or s["in_place_ms"])
        spread = f"{st['median']:.2f} ({st['q1']:.2f}-{st['q3']:.2f})"
        alone = stats.fmt_short(s["isolated_ms_stats"], 2) if s.get("isolated_ms_stats") else "-"
        lines.append(f"  {s['label']:<28} {s['in_place_ms']:12.2f} {100 * s['share']:6.1f}% {spread:>24} {alone:>24}")
    st, spread = r["step_ms"], r.get("step_ms_stats", {})
    wall, model = stats.of(spread.get("wall_clock", st["wall_clock"])), stats.of(spread.get("model_only", st["model_only"]))
    ratio = stats.of(r.get("parts_over_wall_clock_stats", r["parts_over_wall_clock"]))
    lines += [
        (f"  {'step (sum of parts)':<28} {st['sum_of_parts']:12.2f} {100.0:6.1f}% {'':>24} {st['isolated_sum_without_data']:24.2f}"
         "  (isolated: without data)"),
        "",
        f"  step by the wall clock: {stats.fmt(wall, 2)} ms per step, median over windows",
        f"  parts / wall clock per window: {stats.fmt(ratio, 3)}",
        f"  model-only step (data on the device): {stats.fmt(model, 2)} ms",
    ]
    if "loader_efficiency" in r:
        lines.append(f"  loader efficiency (model-only / with the loader): {stats.fmt_ratio_percent(r['loader_efficiency'])}")
    lines += [
        f"  images/s: {r['img_per_s']['in_place']:.0f} in place, {r['img_per_s']['model_only']:.0f} model-only",
        f"  SAIB (forward + backward): {100 * r['saib_share']:.1f}% of the step",
        (f"  {r['flop_per_step'] / 1e12:.3f} TFLOP per step (convolutions and matrix products, forward + backward): "
        f"{r['tflops']['in_place']:.1f} TFLOP/s in place, {r['tflops']['model_only']:.1f} model-only; "
        f"{100 * r['share_of_matmul']['in_place']:.1f}% / {100 * r['share_of_matmul']['model_only']:.1f}% of this "
        f"machine's bf16 matmul rate ({r['matmul_bf16_tflops']:.1f} TFLOP/s measured)"),
    ]
    if r["device"].startswith("cpu"):
        lines.append("  (on a CPU the bf16 matmul rate is no ceiling: the shares above mean nothing there)")
    if r.get("flags"):
        lines += ["", *(f"  {line}" for line in checks.lines(r["flags"]))]
    if "trace" in r:
        lines += ["", f"  trace of {r['trace']['steps']} steps: {r['trace']['path']}", r["trace"]["top_ops"]]
    return "\n".join(lines)


def run_args(args) -> int:
    from iecl.profiling.harness import load_resolved
    from iecl.train.data import resolve_images

    cfg = load_resolved(args.config, args.overrides)
    images = None if args.data_on_device else resolve_images(cfg.data, progress=not args.no_progress)
    start = time.perf_counter()
    report = profile(cfg, images, args.steps, args.warmup, args.isolate_iters, args.trace, args.trace_steps,
                     log=lambda text: tqdm.write(text, file=sys.stderr),  # above the bar, not through it
                     repeats=args.repeats, progress=not args.no_progress)
    report["command_seconds"] = time.perf_counter() - start
    report["command"] = " ".join(["iecl", *sys.argv[1:]])
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
