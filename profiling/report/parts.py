"""The measurements of `iecl report`, one function per part (plan.PARTS).

Each runs in a child process of its own (runner.py), reads the run's plan
from a `Context`, and returns one JSON-serialisable dict, which becomes
`<part>.json` in the report folder. A part that measures several things
saves what it has after each (`ctx.save`), so that a part stopped by its
deadline keeps what it finished. Every measurement here is one of the
project's own commands called as a function (bench saib, bench loader,
profile, compare), at the sizes of the plan's Scale.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import torch

import iecl
from iecl.profiling import stats
from iecl.profiling.machine import device_name, versions
from iecl.profiling.report.plan import Scale


@dataclass
class Context:
    out: Path  # the report folder
    part: str
    scale: Scale
    config: str | None  # --config: the IE-CL ResNet-50 configuration
    overrides: list[str]  # the user's, applied last
    data: str  # the JPEG folder
    work: Path  # where converted data and other large scratch files go (not the report)
    device: str  # "cuda" or "cpu"
    backend: str  # the real loader: dali where it imports, else pil
    cores: int

    @classmethod
    def load(cls, out: Path, part: str) -> Context:
        plan = json.loads((out / "report.json").read_text())["plan"]
        scale = Scale(**{**plan["scale"], "overrides": tuple(plan["scale"]["overrides"])})
        return cls(out, part, scale, plan["config"], plan["overrides"], plan["data"], Path(plan["work"]),
                   plan["device"], plan["backend"], plan["cores"])

    def save(self, result: dict) -> None:
        """Write `<part>.json` now (atomically: a kill never leaves half a file)."""
        path = self.out / f"{self.part}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        tmp.replace(path)

    def training_overrides(self, *extra: str, loader: bool = True) -> list[str]:
        s = self.scale
        sized = [f"train.batch_size={s.batch_size}", f"data.image_size={s.image_size}", f"saib.patch_size={s.patch}",
                 f"train.device={self.device}", *s.overrides]
        data = [f"data.root={self.data}", f"data.backend={self.backend}", f"data.workers={self.cores}"] if loader else []
        return [*sized, *data, *extra, *self.overrides]

    def log(self, text: str) -> None:
        print(f"  {self.part}: {text}", flush=True)


def _error(err: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(err), err)).strip()


# ------------------------------------------------------------- machine


def machine(ctx: Context) -> dict:
    from iecl.profiling.bench_saib import matmul_tflops

    device = torch.device(ctx.device)
    out = {"device": device_name(device), "versions": versions(), "platform": platform.platform(),
           "python_executable": sys.executable, "iecl_package": str(Path(iecl.__file__).resolve().parent),
           **_host()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out["gpu"] = {"name": p.name, "memory_gib": p.total_memory / 2**30, "multiprocessors": p.multi_processor_count,
                      "capability": f"{p.major}.{p.minor}"}
    ctx.log("bf16 matrix product (8192^3 on a GPU, 512^3 on a CPU)")
    out["matmul_bf16_tflops"] = matmul_tflops(device, iters=ctx.scale.ceiling_iters, warmup=3)
    ctx.log("device-to-device copy")
    out["copy_gb_per_s"] = copy_bandwidth(device, ctx.scale.ceiling_iters)
    out["optional_packages"] = optional_packages()  # last: importing ffcv changes torch's thread count
    smi = shutil.which("nvidia-smi")
    if smi:
        text = subprocess.run([smi], check=False, capture_output=True, text=True, timeout=60).stdout
        (ctx.out / "machine.txt").write_text(text)
        out["nvidia_smi"] = "machine.txt"
    return out


def _host() -> dict:
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
        mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))
    except (OSError, StopIteration, ValueError):
        mem_kib = 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": model, "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable,
            "host_memory_gib": mem_kib / 2**20}


def copy_bandwidth(device: torch.device, iters: int) -> float:
    """GB/s of a large device-to-device copy, counting the bytes read and written."""
    n_bytes = 2**30 if device.type == "cuda" else 2**26
    src = torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(iters + 3):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * n_bytes / statistics.median(times) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: importable name -> distribution names to read the version from
_OPTIONAL = {
    "triton": ("triton",),
    "nvidia.dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"),
    "ffcv": ("ffcv",),
    "torchvision": ("torchvision",),
    "timm": ("timm",),
    "apex": ("apex",),
}


def optional_packages() -> dict:
    """For each optional package: its version, or why it cannot be used here."""
    out = {}
    for name, dists in _OPTIONAL.items():
        try:
            module = importlib.import_module(name)
            if name == "ffcv":
                importlib.import_module("ffcv.libffcv")  # the compiled extension FFCV's loader needs
            if name == "apex" and not hasattr(importlib.import_module("apex.optimizers"), "FusedLAMB"):
                raise ImportError("the installed 'apex' is not NVIDIA apex")
            version = _dist_version(dists) or getattr(module, "__version__", None)  # FFCV's own attribute is stale
            out[name] = {"available": True, "version": str(version)}
        except Exception as err:  # noqa: BLE001 - any failure to import is the finding
            out[name] = {"available": False, "why": _error(err).splitlines()[-1]}
    return out


def _dist_version(dists) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


# ------------------------------------------------------------- SAIB alone


def saib(ctx: Context) -> dict:
    from iecl.profiling.bench_saib import IMPLS, run

    s = ctx.scale
    ctx.log(f"batch {s.batch_size}, {s.image_size} px, patch {s.patch}, {s.saib_dtype}: {', '.join(IMPLS)}")
    return run(s.batch_size, s.image_size, s.patch, s.saib_dtype, ctx.device, s.saib_iters, s.saib_warmup, IMPLS,
               progress=True)


# ------------------------------------------------------------- data


def data(ctx: Context) -> dict:
    from iecl.pipeline import open_images
    from iecl.pipeline.synthetic import SyntheticSpec, make_synthetic

    root = Path(ctx.data)
    if not _made_here(ctx):
        images = open_images(root)
        return {"root": str(root), "images": len(images), "made": False}
    ctx.log(f"{ctx.scale.images} JPEGs in {ctx.scale.classes} classes with {ctx.cores} processes")
    start = time.perf_counter()
    info = make_synthetic(root, SyntheticSpec(ctx.scale.images, ctx.scale.classes), workers=ctx.cores, progress=True)
    seconds = time.perf_counter() - start
    return {**info, "made": True, "seconds": seconds, "workers": ctx.cores,
            "img_per_s": None if info["reused"] else ctx.scale.images / seconds}


def _made_here(ctx: Context) -> bool:
    return Path(ctx.data).resolve().is_relative_to(ctx.work.resolve())


# ------------------------------------------------------------- loaders alone


#: the dali.hw_decoder_load values the loader part times besides the shipped one (GPUs only)
HW_DECODER_LOADS = (0.0, 0.9)


def loader(ctx: Context) -> dict:
    """Every loader alone (`runs`), then, for DALI's faster decode mode of this
    run: decoding alone (`decode_only`), on a GPU the loader at the
    `HW_DECODER_LOADS` (`hw_decoder_load`), and the loader with the other DALI
    executor (`executor`); `findings` puts them side by side
    (bench_loader.findings). The extra runs time `stats.MIN_WINDOWS` windows
    (the fewest that judge noise) to keep the part within its estimate."""
    from iecl.pipeline import open_images
    from iecl.profiling.bench_loader import (
        DEFAULT_EXEC_DYNAMIC,
        DEFAULT_HW_DECODER_LOAD,
        _beton_for,
        bench_one,
        findings,
        run_label,
    )

    s, device = ctx.scale, torch.device(ctx.device)
    args = SimpleNamespace(batch_size=s.batch_size, image_size=s.image_size, steps=s.loader_steps,
                           repeats=s.loader_repeats, warmup=s.loader_warmup, workers=ctx.cores, recipe="mocov2", seed=0,
                           beton=str(ctx.work / f"{Path(ctx.data).name}-{s.image_size}px.beton"))
    packages = optional_packages()
    runs = [("pil", "shared")]
    skipped = {}
    if packages["nvidia.dali"]["available"]:
        runs += [("dali", "shared"), ("dali", "window")]
    else:
        skipped["dali"] = packages["nvidia.dali"]["why"]
    if packages["ffcv"]["available"]:
        runs.append(("ffcv", "shared"))
    else:
        skipped["ffcv"] = packages["ffcv"]["why"]
    result = {"device": ctx.device, "batch_size": s.batch_size, "image_size": s.image_size,
              "steps": s.loader_steps, "repeats": s.loader_repeats, "warmup": s.loader_warmup, "workers": ctx.cores,
              "runs": [], "skipped": skipped}

    def timed(backend: str, decode: str, into: list, run_args=args, **dali) -> None:
        label = run_label(backend, decode, dali.get("decode_only", False), dali.get("hw_decoder_load"),
                          dali.get("exec_dynamic", DEFAULT_EXEC_DYNAMIC))
        ctx.log(f"{label}: {run_args.warmup} + {run_args.repeats} x {run_args.steps} batches of {s.batch_size}")
        try:
            start = time.perf_counter()
            images = open_images(ctx.data) if backend != "ffcv" else _converted(ctx, args, _beton_for, result)
            run = asdict(bench_one(images, backend, decode, device, run_args, progress=True, **dali))
            run["seconds_with_startup"] = time.perf_counter() - start
            into.append(run)
        except Exception as err:  # noqa: BLE001 - one backend's failure is a finding; the others still run
            into.append({"backend": backend, "decode": decode if backend == "dali" else None, "label": label, **dali,
                         "error": _error(err)})
            ctx.log(f"{label} failed: {_error(err).splitlines()[-1]}")
        every = (result["runs"] + result.get("decode_only", []) + result.get("hw_decoder_load", {}).get("runs", [])
                 + result.get("executor", []))
        result["findings"] = findings(every)  # saved with each run: a part stopped at its share keeps them
        ctx.save(result)

    for backend, decode in runs:
        timed(backend, decode, result["runs"])
    dali = {r["decode"]: r for r in result["runs"] if r["backend"] == "dali" and "error" not in r}
    if not dali:
        return result
    # The faster decode mode of this run (shared where window did not run or failed).
    mode = max(dali, key=lambda d: (stats.of(dali[d].get("img_per_s_stats") or dali[d]["img_per_s"])["median"]))
    extra = SimpleNamespace(**{**vars(args), "repeats": min(s.loader_repeats, stats.MIN_WINDOWS)})
    result["decode_only"] = []
    sweep = result["hw_decoder_load"] = {"decode": mode, "default": DEFAULT_HW_DECODER_LOAD, "runs": []}
    if device.type == "cuda":
        sweep["values"] = sorted({*HW_DECODER_LOADS, DEFAULT_HW_DECODER_LOAD})
    else:
        sweep["values"] = [DEFAULT_HW_DECODER_LOAD]
        sweep["not_measured"] = (
            f"on {ctx.device} DALI decodes with its cpu decoder, which has no hardware JPEG decoder: the option does "
            f"nothing, so one value ran (the shipped {DEFAULT_HW_DECODER_LOAD:g}: the dali/{mode} run)")
    timed("dali", mode, result["decode_only"], extra, decode_only=True)
    for value in HW_DECODER_LOADS if device.type == "cuda" else ():
        timed("dali", mode, sweep["runs"], extra, hw_decoder_load=value)
    # Last, the other DALI executor (dali.exec_dynamic) on the faster mode: the same graph, scheduled otherwise.
    result["executor"] = []
    timed("dali", mode, result["executor"], extra, exec_dynamic=not DEFAULT_EXEC_DYNAMIC)
    return result


def _converted(ctx: Context, args, beton_for, result: dict):
    from iecl.pipeline.sources import open_beton

    start = time.perf_counter()
    ctx.work.mkdir(parents=True, exist_ok=True)
    path = beton_for(ctx.data, args)
    result["ffcv_conversion_seconds"] = time.perf_counter() - start
    return open_beton(path)


# ------------------------------------------------------------- the step


def _profile_one(ctx: Context, extra: list[str], loader: bool, isolate_iters: int | None = None,
                 repeats: int | None = None) -> dict:
    from iecl.pipeline import open_images
    from iecl.profiling.harness import load_resolved
    from iecl.profiling.step_profile import profile

    s = ctx.scale
    cfg = load_resolved(ctx.config, ctx.training_overrides(*extra, loader=loader))
    images = open_images(ctx.data) if loader else None
    isolate = s.isolate_iters if isolate_iters is None else isolate_iters
    report = profile(cfg, images, s.profile_steps, s.profile_warmup, isolate, log=ctx.log,
                     repeats=s.profile_repeats if repeats is None else repeats)
    report["overrides"] = ctx.training_overrides(*extra, loader=loader)
    return report


def profile_r50(ctx: Context) -> dict:
    return _profile_one(ctx, [f"model.backbone={ctx.scale.r50}", "train.compile=false"], loader=True)


def profile_r18(ctx: Context) -> dict:
    return _profile_one(ctx, ["model.backbone=resnet18", "train.compile=false"], loader=True)


def profile_r50_compile(ctx: Context) -> dict:
    return _profile_one(ctx, [f"model.backbone={ctx.scale.r50}", "train.compile=true"], loader=True)


def profile_r18_compile(ctx: Context) -> dict:
    return _profile_one(ctx, ["model.backbone=resnet18", "train.compile=true"], loader=True)


def profile_r18_compile_fused(ctx: Context) -> dict:
    """profile-r18-compile with both views in one encoder call: the lever is
    meant for compiled encoders (eager, the levers part times its cost)."""
    return _profile_one(ctx, ["model.backbone=resnet18", "train.compile=true", "model.fused_views=true"], loader=True)


def saib_in_step(ctx: Context) -> dict:
    """The ResNet-50 step with the other SAIB implementations (the reference is
    profile-r50's), data on the device: SAIB's share of the step per implementation."""
    result: dict = {}
    for impl in ("triton", "compile"):
        if impl == "compile" and ctx.device == "cpu":
            result[impl] = {"skipped": "torch.compile of SAIB on a CPU takes minutes; GPUs only"}
            continue
        ctx.log(f"kernels.saib_impl={impl}")
        try:
            result[impl] = _profile_one(ctx, [f"model.backbone={ctx.scale.r50}", "train.compile=false",
                                              f"kernels.saib_impl={impl}"], loader=False,
                                        isolate_iters=ctx.scale.in_step_isolate_iters,
                                        repeats=ctx.scale.in_step_repeats)
        except Exception as err:  # noqa: BLE001 - recorded; the other implementation still runs
            result[impl] = {"error": _error(err)}
        ctx.save(result)
    return result


# ------------------------------------------------------------- the step's levers

#: (label, overrides): each eager lever of the step-speed work, timed against the
#: defaults in the same process; the defaults run first and again last, so that
#: a drift over the part (clocks, caches warmed by earlier runs) shows as their gap
LEVERS = (
    ("defaults", ()),
    ("spectral norm per convolution", ("model.spectral_batched=false",)),
    ("stem padded to 4 channels", ("model.stem_pad_channels=4",)),
    ("stem padded to 8 channels", ("model.stem_pad_channels=8",)),
    ("both views in one encoder call", ("model.fused_views=true",)),
    ("defaults, again", ()),
)


def levers(ctx: Context) -> dict:
    """The ResNet-50 step (eager, data on the device) under each of LEVERS:
    what each config value the step-speed work added gains or costs here."""
    result: dict = {}
    for label, extra in LEVERS:
        ctx.log(f"{label}: {' '.join(extra) or 'the shipped values'}")
        try:
            result[label] = _profile_one(ctx, [f"model.backbone={ctx.scale.r50}", "train.compile=false", *extra],
                                         loader=False, isolate_iters=0, repeats=ctx.scale.lever_repeats)
        except Exception as err:  # noqa: BLE001 - recorded; the other settings still run
            result[label] = {"error": _error(err), "overrides": list(extra)}
        ctx.save(result)
    return result


# ------------------------------------------------------------- every method


def compare(ctx: Context) -> dict:
    from iecl.pipeline import open_images
    from iecl.profiling import compare as comparing

    s = ctx.scale
    overrides = ctx.training_overrides(f"model.backbone={s.r50}", "train.compile=false")

    def save(partial: dict) -> None:
        ctx.save({**partial, "complete": False})

    result = comparing.compare(ctx.config, overrides, comparing.METHODS, "both", open_images(ctx.data),
                               s.compare_steps, s.compare_warmup, log=ctx.log, on_row=save, repeats=s.compare_repeats,
                               progress=True)
    result["complete"] = True
    comparing.write(result, ctx.out)  # compare.md and compare.png beside compare.json
    return result


# ------------------------------------------------------------- the anchor


def anchor(ctx: Context) -> dict:
    """A plain supervised ResNet-50 training step (cross-entropy over 1,000
    classes, SGD with momentum) at the IE-CL runs' batch, precision and layout:
    what this chip gives a ResNet-50 with none of our method around it."""
    from torch import nn

    from iecl.model.resnet import build_backbone
    from iecl.profiling.harness import load_resolved

    cfg = load_resolved(ctx.config, ctx.training_overrides(f"model.backbone={ctx.scale.r50}", loader=False))
    result = {"batch_size": cfg.train.batch_size, "image_size": cfg.data.image_size,
              "precision": cfg.train.precision, "channels_last": cfg.train.channels_last, "models": {}}
    ours = build_backbone(ctx.scale.r50, spectral_norm=False)
    builders = {f"iecl {ctx.scale.r50} (no spectral norm)": lambda: nn.Sequential(ours, nn.Linear(ours.feature_dim, 1000))}
    try:
        import torchvision

        builders[f"torchvision {ctx.scale.r50}"] = getattr(torchvision.models, ctx.scale.r50)
    except Exception as err:  # noqa: BLE001 - torchvision is optional
        result["torchvision"] = f"not importable: {_error(err).splitlines()[-1]}"
    for name, build in builders.items():
        ctx.log(name)
        try:
            result["models"][name] = supervised_step(build(), cfg, ctx.scale.anchor_steps, ctx.scale.anchor_warmup,
                                                     ctx.scale.anchor_repeats)
        except Exception as err:  # noqa: BLE001
            result["models"][name] = {"error": _error(err)}
        ctx.save(result)
    return result


def supervised_step(model, cfg, steps: int, warmup: int, repeats: int = 1) -> dict:
    """Milliseconds per cross-entropy training step of `model` on random
    images: the median of `repeats` windows of `steps` steps, with the spread."""
    from contextlib import nullcontext

    import torch.nn.functional as F

    from iecl.kernels.view_prep import ViewPrep
    from iecl.pipeline import MEAN_255, STD_255
    from iecl.train.step import DTYPES

    device, dtype = torch.device(cfg.train.device), DTYPES[cfg.train.precision]
    torch.backends.cudnn.benchmark = True
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)
    prepare = ViewPrep(cfg.kernels.view_prep, MEAN_255, STD_255, dtype).to(device)
    shape = (cfg.train.batch_size, cfg.data.image_size, cfg.data.image_size, 3)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (cfg.train.batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(prepare(images)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    windows = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        windows.append(1e3 * (time.perf_counter() - start) / steps)
    ms = stats.summary(windows)
    return {"step_ms": ms["median"], "img_per_s": 1e3 * cfg.train.batch_size / ms["median"], "steps": steps,
            "repeats": repeats, "warmup": warmup, "step_ms_stats": ms,
            "parameters": sum(p.numel() for p in model.parameters())}


def export(ctx: Context) -> dict:
    """`iecl export`'s conversion on this machine's libraries: a ResNet-50 with
    spectral norm (one power iteration done, so sigma is not trivial), exported
    under torchvision's names, loaded strictly into torchvision's and timm's
    resnet50 (classifier removed); the largest feature difference against ours."""
    from iecl.model.resnet import build_backbone, plain_state_dict, to_torchvision_names

    torch.manual_seed(0)
    ours = build_backbone("resnet50", spectral_norm=True)
    x = torch.randn(4, 3, 64, 64)
    ours.train()(x)
    state = to_torchvision_names(plain_state_dict(ours))
    with torch.no_grad():
        expected = ours.eval()(x)
    result = {"tensors": len(state), "libraries": {}}
    builders = {"torchvision": _torchvision_resnet50, "timm": _timm_resnet50}
    for name, build in builders.items():
        try:
            model = build()
            model.load_state_dict(state, strict=True)
            with torch.no_grad():
                got = model.eval()(x)
            diff = (got - expected).abs().max().item() / expected.abs().max().item()
            result["libraries"][name] = {"loaded": True, "max_relative_difference": diff}
        except Exception as err:  # noqa: BLE001 - a library missing or refusing the keys is the finding
            result["libraries"][name] = {"loaded": False, "error": _error(err).splitlines()[-1]}
        ctx.save(result)
    return result


def _torchvision_resnet50():
    import torchvision

    model = torchvision.models.resnet50()
    model.fc = torch.nn.Identity()
    return model


def _timm_resnet50():
    import timm

    return timm.create_model("resnet50", num_classes=0, pretrained=False)


#: part name -> function
RUN = {
    "machine": machine, "saib": saib, "data": data, "loader": loader, "profile-r50": profile_r50,
    "profile-r18": profile_r18, "anchor": anchor, "export": export, "compare": compare, "saib-in-step": saib_in_step,
    "levers": levers, "profile-r18-compile": profile_r18_compile, "profile-r50-compile": profile_r50_compile,
    "profile-r18-compile-fused": profile_r18_compile_fused,
}


def run_part(out: Path, name: str) -> int:
    """The child's whole job: run part `name` of the report in `out`."""
    ctx = Context.load(out, name)
    start = time.perf_counter()
    result = RUN[name](ctx)
    result["part_seconds"] = time.perf_counter() - start
    ctx.save(result)
    return 0
