"""The parent of `iecl report`: one child process per part, each under its
share of the budget (plan.py), then report.md, the charts and the archive.

Why a child per part: a part that overruns its share (a torch.compile
warm-up, typically) can only be stopped cleanly from outside; a CUDA error
poisons its process's context but not the next part's; and each part starts
with the GPU's memory free. The cost is a Python and torch start per part, a
few seconds. The child's output streams to the console as it comes and into
`logs/<part>.log`.

The folder is cumulative: each run records its parts in `report.json` and
keeps the parts of earlier runs into the same folder (with the same plan), so
a report can be made in several calls (`--parts`), and report.md is rebuilt
from everything there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import iecl
from iecl.profiling.report import document
from iecl.profiling.report.plan import BY_NAME, DRY_RUN, FULL, PART_NAMES, share
from iecl.train.config import ConfigError

#: seconds kept back from the parts for writing report.md, the charts and the archive
RESERVE_SECONDS = 8.0
#: every part gets at least this; with less left, the remaining parts are skipped
MIN_SHARE_SECONDS = 3.0
#: seconds a stopped child gets to exit after SIGTERM before SIGKILL
GRACE_SECONDS = 5.0


def run_args(args) -> int:
    out = Path(args.out).expanduser().resolve()
    if args.run_part:  # the child's side
        from iecl.profiling.report.parts import run_part

        return run_part(out, args.run_part)
    scale = DRY_RUN if args.dry_run else FULL
    names = _selected(args)
    budget = 60.0 * (args.budget_minutes if args.budget_minutes is not None else scale.budget_minutes)
    if budget <= RESERVE_SECONDS:
        raise ConfigError(f"--budget-minutes {budget / 60:g} leaves no time for the parts; give at least 0.5")
    record = _open_record(out, _plan(args, scale))
    session = {"command": " ".join(["iecl", *sys.argv[1:]]), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "budget_seconds": budget, "parts": names}
    record["sessions"].append(session)
    _write_record(out, record)  # the children read the plan from it
    deadline = time.monotonic() + budget
    print(f"iecl report: {len(names)} part(s) at {scale.name} size on {record['plan']['device']} in "
          f"{budget / 60:.1f} min; writing {out}", flush=True)
    interrupted = False
    for i, name in enumerate(names):
        status = _run_or_skip(out, record, names, i, deadline, scale)
        record["parts"][name] = status
        _write_record(out, record)
        if status["status"] == "interrupted":
            interrupted = True
            break
    session["seconds"] = budget - (deadline - time.monotonic())
    _write_record(out, record)
    paths = document.write(out, record)
    print(f"iecl report: wrote {', '.join(p.name for p in paths)} in {out}")
    if args.pack:
        archive = pack(out)
        print(f"iecl report: packed {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")
    print(document.parts_table(record))
    if interrupted:
        return 130
    return 1 if any(record["parts"][n]["status"] == "failed" for n in names) else 0


def _selected(args) -> list[str]:
    for name in [*(args.parts or []), *(args.skip or [])]:
        if name not in BY_NAME:
            raise ConfigError(f"unknown report part {name!r}; the parts are {', '.join(PART_NAMES)}")
    names = [n for n in PART_NAMES if (not args.parts or n in args.parts) and n not in (args.skip or [])]
    if not names:
        raise ConfigError("no report part left to run; see --parts and --skip")
    return names


def _plan(args, scale) -> dict:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device here")
    work = Path(args.work).expanduser().resolve()
    data = Path(args.data).expanduser().resolve() if args.data else work / f"synthetic-{scale.images}x{scale.classes}"
    if args.data and not data.exists():
        raise ConfigError(f"--data {args.data}: no such file or folder")
    backend = "dali" if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali") else "pil"
    return {"scale": scale.to_dict(), "config": args.config, "overrides": list(args.overrides), "data": str(data),
            "work": str(work), "device": device, "backend": backend, "cores": os.cpu_count() or 1}


def _open_record(out: Path, plan: dict) -> dict:
    """report.json's content: a new one, or the folder's own if its plan matches."""
    path = out / "report.json"
    plan = json.loads(json.dumps(plan))  # as it reads back (tuples become lists)
    if path.exists():
        record = json.loads(path.read_text())
        if _measures(record["plan"]) != _measures(plan):
            raise ConfigError(f"{out} holds a report of another plan (size, config, overrides, device or data); "
                              "choose another --out")
        record["plan"] = plan
        return record
    try:
        (out / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the report folder {out}: {err.strerror or err}") from None
    return {"plan": plan, "parts": {}, "sessions": []}


def _measures(plan: dict) -> dict:
    """What makes two plans' figures belong in one report (the budget split may differ)."""
    scale = {k: v for k, v in plan["scale"].items() if k not in ("estimates", "budget_minutes")}
    return {"scale": scale, **{k: plan.get(k) for k in ("config", "overrides", "device", "data")}}


def _write_record(out: Path, record: dict) -> None:
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out / "report.json")


def _run_or_skip(out: Path, record: dict, names: list[str], i: int, deadline: float, scale) -> dict:
    name, part = names[i], BY_NAME[names[i]]
    head = f"iecl report: [{i + 1}/{len(names)}] {name}"
    left = deadline - time.monotonic() - RESERVE_SECONDS
    cap = scale.max_share if part.optional else None  # only the parts that may not fit are cut to the cap
    seconds = max(share(left, names[i:], scale.estimates, cap), min(MIN_SHARE_SECONDS, left))
    if part.needs_data and record["parts"].get("data", {}).get("status") != "ok":
        status = {"status": "skipped", "why": "no data: the data part has not succeeded in this report"}
    elif left < MIN_SHARE_SECONDS:
        status = {"status": "skipped", "why": f"the budget is spent ({max(left, 0):.0f} s left)"}
    else:
        print(f"{head}: {part.title} (share {seconds:.0f} s of {left:.0f} s left)", flush=True)
        status = run_child(out, name, seconds, record["plan"]["device"])
    status.setdefault("share_seconds", round(seconds, 1))
    print(f"{head}: {_verdict(status)}", flush=True)
    return status


def _verdict(status: dict) -> str:
    s = status["status"]
    if s == "ok":
        return f"ok in {status['seconds']:.1f} s"
    if s == "over budget":
        return f"stopped at its share ({status['share_seconds']:.0f} s): over budget"
    if s == "failed":
        return f"FAILED after {status['seconds']:.1f} s: {status['error']}"
    return f"{s}: {status.get('why', '')}"


def child_command(out: Path, name: str) -> list[str]:
    """The child's command line: the package's own launcher, so that it runs
    the same code whether iecl is installed or a plain source checkout."""
    launcher = Path(iecl.__file__).resolve().parent / "__main__.py"
    return [sys.executable, str(launcher), "report", "--out", str(out), "--run-part", name]


def run_child(out: Path, name: str, seconds: float, device: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device == "cpu" and name in ("saib", "saib-in-step"):
        env["TRITON_INTERPRET"] = "1"  # Triton runs on CPU tensors only in its interpreter
    log_path = out / "logs" / f"{name}.log"
    (out / f"{name}.json").unlink(missing_ok=True)  # an earlier run's result must not pass for this one's
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(child_command(out, name), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)  # its own group: stop its workers with it
        reader = threading.Thread(target=_stream, args=(proc.stdout, log), daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=seconds)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop(proc)
            status = "over budget"
        except KeyboardInterrupt:
            _stop(proc)
            status = "interrupted"
        reader.join(timeout=10)
    result = {"status": status, "seconds": round(time.monotonic() - start, 1), "log": f"logs/{name}.log"}
    if status == "failed":
        result["error"] = _last_error(log_path)
    if status != "ok" and (out / f"{name}.json").exists():
        result["partial"] = True  # the part saved what it finished before it stopped
    return result


def _stream(pipe, log) -> None:
    """Copy the child's output to our stdout and its log, as it arrives."""
    while chunk := os.read(pipe.fileno(), 65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        log.write(chunk)
        log.flush()


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            continue


#: a progress bar's redraw ("desc:  50%|#####     | 3/6 [...]"), which is no error
_PROGRESS = re.compile(r"\d+%\|")
#: the last line of a Python traceback ("ValueError: ...", "triton.runtime.errors.InterpreterError: ...")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


def _last_error(log_path: Path) -> str:
    """What a failed part's log says went wrong: the last exception line of a
    traceback if there is one, else the last line that is not a progress bar's
    redraw (a bar interrupted by the error would otherwise stand in for it)."""
    text = log_path.read_text(errors="replace").replace("\r", "\n")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _PROGRESS.search(line)]
    exceptions = [line for line in lines if _EXCEPTION.match(line)]
    if exceptions:
        return exceptions[-1]
    return lines[-1] if lines else "exited with no output"


def pack(out: Path) -> Path:
    """The whole report folder as one .tar.gz beside it."""
    archive = out.with_name(out.name + ".tar.gz")
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    tmp.replace(archive)
    return archive
