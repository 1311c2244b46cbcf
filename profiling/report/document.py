"""report.md and the charts of `iecl report`, from the parts' JSON files.

Everything here reads what the parts wrote; nothing is measured. A part that
did not run, failed or was stopped at its share is shown as such, with what
it saved before it stopped. Times are medians of repeated windows with their
min-max in brackets (profiling/stats.py); the checks the parts ran
(profiling/checks.py) are gathered in one section near the top.
"""

from __future__ import annotations

import json
from pathlib import Path

from iecl.profiling import checks, stats
from iecl.profiling.report.plan import BY_NAME, PART_NAMES

#: the pipelines work's bar: DALI's GPU decode at least this many times PIL on every core
DALI_OVER_PIL_BAR = 3.0


def load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _f(value, fmt: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def _get(d: dict | None, *keys):
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


# ------------------------------------------------------------- the figures the report is for


def dali_over_pil(loader: dict | None) -> dict | None:
    runs = [r for r in (loader or {}).get("runs", []) if "error" not in r]
    pil = next((r for r in runs if r["backend"] == "pil"), None)
    dali = max((r for r in runs if r["backend"] == "dali"), key=lambda r: r["img_per_s"], default=None)
    if pil is None or dali is None:
        return None
    return {"pil": pil["img_per_s"], "pil_workers": pil["workers"], "dali": dali["img_per_s"],
            "dali_decode": dali["decode"], "ratio": dali["img_per_s"] / pil["img_per_s"]}


def loader_efficiency(profile: dict | None) -> float | None:
    """Model-only step time over real-loader step time (1.0: the loader hides behind the model)."""
    steps = _get(profile, "step_ms")
    return steps["model_only"] / steps["wall_clock"] if steps else None


def _step_stats(profile: dict, kind: str) -> dict:
    """A profile's step-ms summary of `kind` (wall_clock, model_only); an older record: its one figure."""
    return _get(profile, "step_ms_stats", kind) or stats.of(profile["step_ms"][kind])


def efficiency_text(profile: dict | None) -> str:
    """The loader efficiency with its interval and the noise verdict."""
    if not _get(profile, "step_ms"):
        return "-"
    return stats.fmt_ratio_percent(stats.ratio(_step_stats(profile, "model_only"), _step_stats(profile, "wall_clock")))


def compile_speedup(eager: dict | None, compiled: dict | None, kind: str) -> dict | None:
    """Eager over compiled step time (a stats.ratio interval)."""
    if not (_get(eager, "step_ms", kind) and _get(compiled, "step_ms", kind)):
        return None
    return stats.ratio(_step_stats(eager, kind), _step_stats(compiled, kind))


def _speedup_text(speed: dict | None) -> str:
    return "-" if speed is None else stats.fmt_times(speed)


def _ms(profile: dict | None, kind: str) -> str:
    """A profile's step ms as 'median (min-max)'."""
    return stats.fmt_short(_step_stats(profile, kind)) if _get(profile, "step_ms", kind) is not None else "-"


def saib_shares(out: Path) -> dict:
    """SAIB's share of the ResNet-50 step (forward + backward, in place) per implementation."""
    shares = {"reference": _get(load(out, "profile-r50"), "saib_share")}
    in_step = load(out, "saib-in-step") or {}
    for impl in ("triton", "compile"):
        shares[impl] = _get(in_step, impl, "saib_share")
    return shares


def headline(out: Path, record: dict) -> list[str]:
    """The figures side by side, each with the bar it answers to."""
    r50, r18 = load(out, "profile-r50"), load(out, "profile-r18")
    r50c, r18c = load(out, "profile-r50-compile"), load(out, "profile-r18-compile")
    parts = record["parts"]
    lines = ["| figure | this run | bar |", "| --- | --- | --- |"]
    d = dali_over_pil(load(out, "loader"))
    if d:
        met = "met" if d["ratio"] >= DALI_OVER_PIL_BAR else "not met"
        lines.append(f"| DALI ({d['dali_decode']}) vs PIL on {d['pil_workers']} cores, img/s | "
                     f"{d['dali']:,.0f} vs {d['pil']:,.0f}: {d['ratio']:.2f}x | >= {DALI_OVER_PIL_BAR:g}x: {met} |")
    else:
        lines.append(f"| DALI vs PIL, img/s | not measured ({_status_text(parts, 'loader')}) | >= {DALI_OVER_PIL_BAR:g}x |")
    for prof, name in ((r50, "profile-r50"), (r18, "profile-r18")):
        lines.append(f"| loader efficiency, IE-CL + SAIB {_backbone(prof, name)} ({_get(prof, 'data') or 'real loader'}) | "
                     f"{efficiency_text(prof)} (model-only {_ms(prof, 'model_only')} ms "
                     f"/ with the loader {_ms(prof, 'wall_clock')} ms){_over_100(prof)} | "
                     "100%: the loader hides behind the step |")
    for eager, compiled, name in ((r50, r50c, "profile-r50-compile"), (r18, r18c, "profile-r18-compile")):
        label = _backbone(eager, name.removesuffix("-compile"))
        if compiled:
            speed = compile_speedup(eager, compiled, "model_only")
            lines.append(f"| compile on vs off, {label} step (data on the device) | "
                         f"{_ms(eager, 'model_only')} ms eager, "
                         f"{_ms(compiled, 'model_only')} ms compiled: {_speedup_text(speed)}; "
                         f"warm-up {_f(_get(compiled, 'warmup_seconds'), '.0f')} s | >= 1.5x, warm-up <= 120 s |")
        else:
            lines.append(f"| compile on vs off, {label} | {_status_text(parts, name)} | >= 1.5x, warm-up <= 120 s |")
    shares = saib_shares(out)
    lines.append(f"| SAIB's share of the IE-CL {_backbone(r50, 'profile-r50')} step | " +
                 ", ".join(f"{impl} {_f(s and 100 * s, '.1f', '%')}" for impl, s in shares.items()) + " | "
                 "the paper's overhead: 8.8% |")
    anchor = load(out, "anchor")
    for name, row in (_get(anchor, "models") or {}).items():
        ours = _get(r50, "img_per_s", "model_only")
        lines.append(f"| plain supervised step, {name} | {_f(_get(row, 'img_per_s'), ',.0f')} img/s "
                     f"({_f(_get(row, 'step_ms'))} ms); IE-CL + SAIB model-only {_f(ours, ',.0f')} img/s | "
                     "what the chip gives a ResNet with no method around it |")
    return lines


def _backbone(profile: dict | None, name: str) -> str:
    """The backbone a profile ran, and its part (the dry run builds a ResNet-18
    for the ResNet-50 parts)."""
    return f"{_get(profile, 'backbone') or ('resnet18' if 'r18' in name else 'resnet50')} ({name})"


def _over_100(profile: dict | None) -> str:
    """A loader cannot make a step faster than the data already on the device:
    above 100% within noise reads as 100%; beyond noise it is a failed check."""
    eff = loader_efficiency(profile)
    if eff is None or eff <= 1.0:
        return ""
    verdict = stats.beyond(stats.ratio(_step_stats(profile, "model_only"), _step_stats(profile, "wall_clock")), 1.0)
    if verdict:
        return "; impossible beyond noise: see Checks"
    return "; above 100% within noise: read it as 100%, the loader hidden"


def all_flags(out: Path) -> list[dict]:
    """Every check that failed in the report's parts, in part order."""
    flags = []
    for name in PART_NAMES:
        part = load(out, name)
        if not isinstance(part, dict):
            continue
        flags += [{**f, "part": name} for f in part.get("flags", [])]
        for impl, sub in part.items():  # saib-in-step: one profile per implementation
            if isinstance(sub, dict) and "flags" in sub and "step_ms" in sub:
                flags += [{**f, "part": f"{name}/{impl}"} for f in sub["flags"]]
    return flags


def _checks(out: Path) -> list[str]:
    flags = all_flags(out)
    text = ("Each figure is the median of repeated windows; a difference smaller than the spread (min-max ranges "
            f"that overlap) is marked within noise, and with fewer than {stats.MIN_WINDOWS} windows the noise is not "
            "known and nothing is called beyond it. Checked: a real loader faster than the data on the device, "
            "SAIB making a step faster, a profile's stages adding up to more or far less than the step, in-place "
            "and isolated stage times 2x apart, a rate above the device's own matmul.")
    if not flags:
        return [text, "", "No check failed."]
    return [text, "", *(f"{line} (part {f['part']})" for f, line in zip(flags, checks.lines(flags)))]


def _status_text(parts: dict, name: str) -> str:
    status = parts.get(name)
    if status is None:
        return "not run"
    if status["status"] == "over budget":
        return f"stopped at its share of the budget ({status['share_seconds']:.0f} s)"
    if status["status"] == "failed":
        return f"failed: {status.get('error', '')}"
    return status["status"] + (f": {status['why']}" if status.get("why") else "")


# ------------------------------------------------------------- sections


def _machine(m: dict | None) -> list[str]:
    if not m:
        return ["Not measured."]
    lines = [f"- device: {m['device']}" + (f", {m['gpu']['memory_gib']:.0f} GiB, {m['gpu']['multiprocessors']} SMs, "
                                         f"capability {m['gpu']['capability']}" if m.get("gpu") else ""),
             (f"- CPU: {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable), {m['cpu_model']}; "
             f"{m['host_memory_gib']:.0f} GiB host memory"),
             (f"- bf16 matrix product: **{m['matmul_bf16_tflops']:.1f} TFLOP/s**; device-to-device copy: "
             f"**{m['copy_gb_per_s']:.0f} GB/s** (bytes read + written)"),
             "- software: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
             "- optional packages: " + "; ".join(
                 f"{k} {v['version']}" if v["available"] else f"{k}: no ({v['why']})"
                 for k, v in m["optional_packages"].items())]
    if m.get("nvidia_smi"):
        lines.append(f"- `nvidia-smi`: {m['nvidia_smi']}")
    return lines


def _saib(s: dict | None) -> list[str]:
    if not s:
        return ["Not measured."]
    c = s["config"]
    lines = [(f"Batch {c['batch_size']}, {c['image_size']} px, patch {c['patch']}, {c['dtype']}, {c['weights']} weights; "
             f"median (min-max) of {c['iters']} runs after {c['warmup']}; forward = {s['flop']['forward'] / 1e9:.1f} GFLOP."), "",
             "| implementation | forward ms | backward ms | forward + backward ms | TFLOP/s (f+b) | of matmul |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for impl, row in s["results"].items():
        ms = {phase: stats.fmt_short(stats.of(row.get(f"{phase}_ms_stats") or row[f"{phase}_ms"]), 2)
              for phase in ("forward", "backward", "forward_backward")}
        lines.append(f"| {impl} | {ms['forward']} | {ms['backward']} | {ms['forward_backward']} | "
                     f"{row['forward_backward_tflops']:.1f} | {100 * row['forward_backward_share_of_matmul']:.1f}% |")
    return lines + [f"- {note}" for note in s.get("notes", [])]


def _loader(r: dict | None) -> list[str]:
    if not r:
        return ["Not measured."]
    windows = f"{r.get('repeats', 1)} windows of {r['steps']}"
    lines = [(f"Batch {r['batch_size']}, {r['image_size']} px, two views, delivered on {r['device']}; "
             f"{r['warmup']} + {windows} batches; {r['workers']} workers; img/s: the median (min-max) of the windows."), "",
             "| backend | img/s | step ms (median) | p90 ms | host MB | GPU MB |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for run in r["runs"]:
        name = run["backend"] + (f"/{run['decode']}" if run.get("decode") else "")
        if "error" in run:
            lines.append(f"| {name} | failed: {run['error'].splitlines()[-1]} | | | | |")
            continue
        rate = stats.fmt_short(stats.of(run.get("img_per_s_stats") or run["img_per_s"]), 0, thousands=True)
        lines.append(f"| {name} | {rate} | {run['step_ms_median']:.1f} | {run['step_ms_p90']:.1f} | "
                     f"{run['peak_host_mb']:.0f} | {_f(run['peak_gpu_mb'], '.0f')} |")
    lines += [f"- {backend}: not run ({why})" for backend, why in r.get("skipped", {}).items()]
    if r.get("ffcv_conversion_seconds") is not None:
        lines.append(f"- FFCV conversion (once, not timed above): {r['ffcv_conversion_seconds']:.0f} s")
    return lines + _decode_mode(r) + _decode_alone(r) + _hw_decoder_load(r) + _executor(r)


def _executor(r: dict) -> list[str]:
    """The loader with the other DALI executor (`executor`, `findings.executor`)."""
    from iecl.profiling.bench_loader import (  # torch: only when needed
        DEFAULT_EXEC_DYNAMIC,
        executor_sentence,
    )

    runs = r.get("executor")
    if runs is None:
        return []
    failed = [f"- {run.get('label', 'dali')}: failed: {run['error'].splitlines()[-1]}" for run in runs if "error" in run]
    found = [f"- DALI {executor_sentence(row)} (the shipped dali.exec_dynamic is "
             f"{str(DEFAULT_EXEC_DYNAMIC).lower()})." for row in _get(r, "findings", "executor") or []]
    return ["", *failed, *found] if failed or found else []


def _decode_mode(r: dict) -> list[str]:
    """Which DALI decode mode won (`findings.decode_modes`), for data.decode's default."""
    rows = [row for row in _get(r, "findings", "decode_modes") or [] if row["hw_decoder_load"] in (None, r.get(
        "hw_decoder_load", {}).get("default"))]
    if not rows:
        return []
    row = rows[0]
    change = {True: ("shared is the shipped data.decode: keep it" if row["winner"] == "shared"
                     else "the shipped data.decode is shared: this run says window"),
              False: "no reason from this run to change the shipped data.decode, shared",
              None: "too few windows to set data.decode's default from"}[row["beyond_noise"]]
    return ["", (f"DALI decode modes: **{row['winner']}** was faster than {row['loser']}, "
                 f"{row['winner_img_per_s']['median']:,.0f} vs {row['loser_img_per_s']['median']:,.0f} img/s: "
                 f"{stats.fmt_times(row['ratio'])}, {stats.fmt_verdict(row['beyond_noise'])} ({change}).")]


def _decode_alone(r: dict) -> list[str]:
    """Decoding alone beside the full loader (`decode_only`, `findings.decode_share`)."""
    runs = r.get("decode_only")
    if runs is None:
        return []
    lines = ["", ("Decoding alone (`iecl bench loader --decode-only`: the same reader, files, threads and decoder with "
                  "the same options, no crop, resize or colour work; the decoder's limit on this machine). "
                  "Decode's share = the loader's img/s over decoding's: the share of the loader's time per image "
                  "that decoding alone takes (DALI overlaps its stages: the rest is what the views' work adds)."), "",
             "| run | decoder | windows | decode-only img/s | the loader's img/s | decode's share of the loader's time |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    shares = {(row["decode"], row["hw_decoder_load"]): row for row in _get(r, "findings", "decode_share") or []}
    for run in runs:
        name = run.get("label") or f"dali/{run['decode']}/decode-only"
        if "error" in run:
            lines.append(f"| {name} | failed: {run['error'].splitlines()[-1]} | | | | |")
            continue
        rate = stats.of(run.get("img_per_s_stats") or run["img_per_s"])
        share = shares.get((run["decode"], run.get("hw_decoder_load")))
        decoder = {"mixed": "mixed (nvJPEG)", "cpu": "cpu (libjpeg-turbo)"}.get(run.get("decoder"), "-")
        loader = stats.fmt_short(share["loader_img_per_s"], 0, thousands=True) if share else "-"
        part = (f"{100 * share['share']['value']:.0f}% ({100 * share['share']['low']:.0f}-"
                f"{100 * share['share']['high']:.0f}%)" if share else "-")
        lines.append(f"| {name} | {decoder} | {rate['n']} | {stats.fmt_short(rate, 0, thousands=True)} | {loader} | "
                     f"{part} |")
    return lines


def _hw_decoder_load(r: dict) -> list[str]:
    """The loader at several dali.hw_decoder_load values (GPUs only)."""
    sweep = r.get("hw_decoder_load")
    if not sweep:
        return []
    if sweep.get("not_measured"):
        return ["", f"- dali.hw_decoder_load: not measured: {sweep['not_measured']}."]
    default = sweep["default"]
    shipped = next((run for run in r["runs"] if run.get("backend") == "dali" and run.get("decode") == sweep["decode"]
                    and "error" not in run), None)
    lines = ["", (f"dali.hw_decoder_load (the share of each batch nvJPEG gives the hardware JPEG decoder), "
                  f"dali/{sweep['decode']}; the shipped {default:g} is the dali/{sweep['decode']} run above:"), "",
             "| hw_decoder_load | windows | img/s | vs the shipped |", "| ---: | ---: | ---: | ---: |"]
    base = stats.of(shipped.get("img_per_s_stats") or shipped["img_per_s"]) if shipped else None
    rows = [(default, shipped)] + [(run.get("hw_decoder_load"), run) for run in sweep["runs"]]
    for value, run in sorted(rows, key=lambda row: row[0] if row[0] is not None else -1):
        shown = f"{value:g}" + (" (shipped)" if value == default else "")
        if run is None or "error" in run:
            why = run["error"].splitlines()[-1] if run else "not run"
            lines.append(f"| {shown} | | failed: {why} | |")
            continue
        rate = stats.of(run.get("img_per_s_stats") or run["img_per_s"])
        versus = stats.fmt_times(stats.ratio(rate, base)) if base and value != default else "-"
        lines.append(f"| {shown} | {rate['n']} | {stats.fmt_short(rate, 0, thousands=True)} | {versus} |")
    best = next(iter(_get(r, "findings", "hw_decoder_load") or []), None)
    if best and "best_over_default" in best:
        lines.append(f"- fastest: {best['best']:g}, {stats.fmt_times(best['best_over_default'])} the shipped {default:g}, "
                     f"{stats.fmt_verdict(best['beyond_noise'])}.")
    return lines


_PROFILES = (("profile-r50", "eager"), ("profile-r50-compile", "compiled"),
             ("profile-r18", "eager"), ("profile-r18-compile", "compiled"),
             ("profile-r18-compile-fused", "compiled, both views in one call"))


def _profiles(out: Path, parts: dict) -> list[str]:
    lines = [("| step | with the loader ms | img/s | data on the device ms | img/s | loader efficiency | "
             "SAIB share | TFLOP/s (model-only) | warm-up s |"), "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, mode in _PROFILES:
        p = load(out, name)
        label = f"{_backbone(p, name)}, {mode}"
        if not p:
            lines.append(f"| {label} | {_status_text(parts, name)} | | | | | | | |")
            continue
        lines.append(f"| {label} | {_ms(p, 'wall_clock')} | {p['img_per_s']['in_place']:,.0f} | {_ms(p, 'model_only')} | "
                     f"{p['img_per_s']['model_only']:,.0f} | {efficiency_text(p)} | "
                     f"{100 * p['saib_share']:.1f}% | {p['tflops']['model_only']:.1f} | {p['warmup_seconds']:.0f} |")
    lines += ["", "Step times: the median (min-max) of each profile's windows (`repeats` x `steps` in its JSON)."]
    r50 = load(out, "profile-r50")
    if r50:
        lines += ["", f"Stages of profile-r50, in place with the loader ({r50['config']}; {r50['data']}):", "",
                  "| stage | in place ms (mean) | share | in place per step, median (min-max) | isolated ms, median (min-max) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for s in r50["stages"].values():
            here = stats.fmt_short(stats.of(s.get("in_place_ms_stats") or s["in_place_ms"]), 2)
            alone = stats.fmt_short(s["isolated_ms_stats"], 2) if s.get("isolated_ms_stats") else _f(s["isolated_ms"], ".2f")
            lines.append(f"| {s['label']} | {s['in_place_ms']:.2f} | {100 * s['share']:.1f}% | {here} | {alone} |")
        lines.append(f"| step (sum of parts; wall clock {stats.fmt_short(_step_stats(r50, 'wall_clock'), 2)}) | "
                     f"{r50['step_ms']['sum_of_parts']:.2f} | | | |")
    in_step = load(out, "saib-in-step") or {}
    for impl, p in in_step.items():
        if not isinstance(p, dict) or "step_ms" not in p:
            if isinstance(p, dict):
                lines.append(f"- SAIB {impl} in the step: {p.get('error') or p.get('skipped')}")
            continue
        fwd, bwd = _get(p, "stages", "saib_fwd", "in_place_ms"), _get(p, "stages", "saib_bwd", "in_place_ms")
        lines.append(f"- SAIB {impl} in the {p['backbone']} step (data on the device): forward {_f(fwd, '.2f')} ms, "
                     f"backward {_f(bwd, '.2f')} ms, {100 * p['saib_share']:.1f}% of a {p['step_ms']['wall_clock']:.1f} ms step")
    return lines


def _fused_compiled(out: Path, parts: dict) -> list[str]:
    """Both views in one encoder call where the lever is meant to pay: compiled,
    against the compiled two-call step (profile-r18-compile)."""
    name = "profile-r18-compile-fused"
    one, two = load(out, name), load(out, "profile-r18-compile")
    if not one:
        return [f"Compiled, both views in one encoder call: not measured ({_status_text(parts, name)})."]
    text = (f"Compiled, {_backbone(one, name)}, model-only (data on the device): both views in one encoder call "
            f"{_ms(one, 'model_only')} ms, two calls {_ms(two, 'model_only')} ms: "
            f"{_speedup_text(compile_speedup(two, one, 'model_only'))} (above 1.00x one call is faster; its warm-up "
            f"{_f(_get(one, 'warmup_seconds'), '.0f')} s). Predicted on an H100-class GPU: 2-6% faster (half the "
            "graph calls and convolution launches, GEMMs twice as tall; Inductor folds the per-view concatenation "
            "into the normalisation).")
    return [text]


def _levers(levers: dict | None, parts: dict) -> list[str]:
    """Each lever's model-only step against the defaults timed in the same part."""
    if not levers:
        return [f"Not measured ({_status_text(parts, 'levers')})."]
    base = levers.get("defaults")
    shipped = set(_get(base, "overrides") or [])
    lines = ["| setting | overrides | model-only ms | img/s | defaults / this (speed-up) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for label, p in levers.items():
        if not isinstance(p, dict):  # part_seconds
            continue
        overrides = " ".join(o for o in _get(p, "overrides") or [] if o not in shipped)  # what differs from the defaults
        if "error" in p or not _get(p, "step_ms", "model_only"):
            lines.append(f"| {label} | {overrides or '-'} | {p.get('error', 'no figure')} | | |")
            continue
        speed = "-" if label == "defaults" else _speedup_text(compile_speedup(base, p, "model_only"))
        lines.append(f"| {label} | {overrides or '(shipped values)'} | {_ms(p, 'model_only')} | "
                     f"{p['img_per_s']['model_only']:,.0f} | {speed} |")
    lines += ["", ("Eager, data on the device, in place only; above 1.00x the setting is faster than the defaults "
               "(their first run; the gap to 'defaults, again' is the drift over the part). "
              "Predicted on an H100-class GPU (not measured before this part): spectral norm per convolution "
              "4.5-6.7 ms slower per step (1,124 more kernel launches at 4-6 us); the stem padded to 4 or 8 "
              "channels 1-3 ms faster if cuDNN's 3-channel 7x7 input gradient is off the tensor cores, else "
              "no gain; both views in one encoder call 5-12% slower eager (each BatchNorm's concatenation "
              "adds two passes over its output to the forward's element-wise traffic, against half the "
              "convolution launches; the gain is meant for compiled encoders, where Inductor folds the "
              "concatenation into the normalisation).")]
    return lines


def _compare(c: dict | None) -> list[str]:
    if not c:
        return ["Not measured."]
    from iecl.profiling.compare import markdown

    body = markdown(c).split("\n", 1)[1]  # without its own title
    note = [] if c.get("complete") else ["", f"Partial: {len(c['rows'])} of 10 configurations finished in the budget."]
    return [body.rstrip(), *note, "", "![every method, with and without SAIB](compare.png)"]


def _anchor(a: dict | None) -> list[str]:
    if not a:
        return ["Not measured."]
    lines = [(f"Batch {a['batch_size']}, {a['image_size']} px, {a['precision']}, "
             f"{'channels-last' if a['channels_last'] else 'NCHW'}; cross-entropy over 1,000 classes, SGD with momentum."),
             "", "| model | step ms, median (min-max) of the windows | img/s | parameters |", "| --- | ---: | ---: | ---: |"]
    for name, row in a["models"].items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'].splitlines()[-1]} | | |")
        else:
            ms = stats.fmt_short(stats.of(row.get("step_ms_stats") or row["step_ms"]))
            lines.append(f"| {name} | {ms} | {row['img_per_s']:,.0f} | {row['parameters'] / 1e6:.1f} M |")
    if a.get("torchvision"):
        lines.append(f"- torchvision: {a['torchvision']}")
    return lines


def _export(e: dict | None) -> list[str]:
    if not e:
        return ["Not measured."]
    lines = [f"A ResNet-50 with spectral norm, exported under torchvision's names ({e['tensors']} tensors):", ""]
    for name, r in e["libraries"].items():
        lines.append(f"- {name}: " + (f"loads strictly; features within {r['max_relative_difference']:.1e} (relative)"
                                      if r["loaded"] else f"not loaded: {r['error']}"))
    return lines


def parts_table(record: dict) -> str:
    lines = ["| part | status | seconds | share s | note |", "| --- | --- | ---: | ---: | --- |"]
    for name in PART_NAMES:
        s = record["parts"].get(name)
        if s is None:
            continue
        note = s.get("error") or s.get("why") or ""
        if s.get("partial"):
            note = (note + "; " if note else "") + "kept what it saved before it stopped"
        if BY_NAME[name].optional and s["status"] == "over budget":
            note = (note + "; " if note else "") + BY_NAME[name].optional
        lines.append(f"| {name} | {s['status']} | {_f(s.get('seconds'))} | {_f(s.get('share_seconds'), '.0f')} | {note} |")
    return "\n".join(lines)


def markdown(out: Path, record: dict) -> str:
    plan, machine = record["plan"], load(out, "machine")
    scale = plan["scale"]
    title = machine["device"] if machine else plan["device"]
    lines = [f"# iecl report: {title}", ""]
    for s in record["sessions"]:
        lines.append(f"- {s['started']}: `{s['command']}` ({s.get('seconds', 0):.0f} s of a {s['budget_seconds']:.0f} s budget)")
    lines += ["", (f"Size: {scale['name']} (batch {scale['batch_size']}, {scale['image_size']} px, SAIB patch {scale['patch']}; "
                   f"config {plan['config'] or 'smoke'}" + (f" with {' '.join(plan['overrides'])}" if plan["overrides"] else "")
                   + f"); real loader: {plan['backend']} on {plan['cores']} cores; data: {plan['data']}."),
              "", "## The figures, side by side", "", *headline(out, record),
              "", "## Checks", "", *_checks(out),
              "", "## Parts (each in its own process, under its share of the budget)", "", parts_table(record),
              "", "## 1. Machine", "", *_machine(machine),
              "", "## 2. SAIB alone (`iecl bench saib`)", "", *_saib(load(out, "saib")),
              "", "## 3. Loaders alone (`iecl bench loader`)", "", *_loader(load(out, "loader")),
              *([""] + ["![loaders](loader.png)"] if (out / "loader.png").exists() else []),
              "", "## 4. The IE-CL + SAIB step (`iecl profile`)", "", *_profiles(out, record["parts"]),
              *([""] + ["![steps](steps.png)"] if (out / "steps.png").exists() else []),
              "", "### The step's levers (`iecl profile` with one setting changed)", "",
              *_levers(load(out, "levers"), record["parts"]),
              "", *_fused_compiled(out, record["parts"]),
              "", "## 5. Every method with and without SAIB, ResNet-50 (`iecl compare`)", "", *_compare(load(out, "compare")),
              "", "## 6. Anchor: a plain supervised ResNet-50 step", "", *_anchor(load(out, "anchor")),
              "", "## 7. The exported backbone in torchvision and timm (`iecl export`)", "", *_export(load(out, "export"))]
    if scale["name"] == "dry-run":
        lines += ["", "This is a dry run: toy sizes, every code path of the full report; its times mean nothing."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------- charts


def _barh(path: Path, labels: list[str], values: list[dict], xlabel: str, title: str, caption: str) -> None:
    """Horizontal bars of summaries: the median, error bars to the min-max,
    each value labelled beyond its error bar, the repeat count in the caption."""
    fig = barh_figure(labels, values, xlabel, title, caption)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def barh_figure(labels: list[str], values: list[dict], xlabel: str, title: str, caption: str):
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # constrained layout keeps the tick labels, title and caption inside the figure
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(labels) + 2), layout="constrained")
    medians = [v["median"] for v in values]
    below, above = zip(*(stats.error_bar(v) for v in values))
    ax.barh(range(len(labels)), medians, color="#4c72b0", tick_label=[textwrap.fill(label, 48) for label in labels],
            xerr=[list(below), list(above)], capsize=3, ecolor="black")
    for y, v in enumerate(values):
        ax.annotate(f"{v['median']:,.0f}", (v["max"], y), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    fig.suptitle(textwrap.fill(title, 100), fontsize=10)  # centred on the figure, not on the axes beside the labels
    ax.set_xlim(0, max(v["max"] for v in values) * 1.25)  # room for the labels beyond the error bars
    fig.supxlabel(textwrap.fill(caption, 120), fontsize=8)
    return fig


def _rate(summary_ms: dict, batch: int) -> dict:
    """images/s per window from a step-ms summary."""
    return stats.mapped(summary_ms, lambda ms: 1e3 * batch / ms)


def charts(out: Path, record: dict) -> list[Path]:
    paths = []
    machine = load(out, "machine")
    device = machine["device"] if machine else record["plan"]["device"]
    loader = load(out, "loader")
    runs = [r for r in (loader or {}).get("runs", []) if "error" not in r]
    if runs:
        path = out / "loader.png"
        _barh(path, [r["backend"] + (f"/{r['decode']}" if r.get("decode") else "") for r in runs],
              [stats.of(r.get("img_per_s_stats") or r["img_per_s"]) for r in runs],
              "images/s (two views each, on the device)",
              f"{device}: loaders alone, batch {loader['batch_size']}, {loader['image_size']} px",
              f"Bars: the median of {loader.get('repeats', 1)} windows of {loader['steps']} batches; "
              "error bars: min-max of the windows.")
        paths.append(path)
    labels, values, windows = [], [], set()
    for name, mode in _PROFILES:
        p = load(out, name)
        if p:
            label = f"{_backbone(p, name)}, {mode}"
            labels += [f"{label}, with the loader", f"{label}, data on the device"]
            values += [_rate(_step_stats(p, "wall_clock"), p["batch_size"]),
                       _rate(_step_stats(p, "model_only"), p["batch_size"])]
            windows.add(f"{p.get('repeats', 1)} x {p['steps']}")
    anchor = load(out, "anchor")
    for name, row in (_get(anchor, "models") or {}).items():
        if "img_per_s" in row:
            labels.append(f"supervised {name}")
            values.append(_rate(stats.of(row.get("step_ms_stats") or row["step_ms"]), anchor["batch_size"]))
            windows.add(f"{row.get('repeats', 1)} x {row['steps']}")
    if values:
        path = out / "steps.png"
        _barh(path, labels, values, "images/s", f"{device}: IE-CL + SAIB training steps and the supervised anchor",
              f"Bars: the median window (windows x steps: {', '.join(sorted(windows))}); error bars: min-max of the windows.")
        paths.append(path)
    return paths


def write(out: Path, record: dict) -> list[Path]:
    paths = charts(out, record)
    md = out / "report.md"
    md.write_text(markdown(out, record))
    return [md, out / "report.json", *paths]
