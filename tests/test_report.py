"""`iecl report`: the dry run end to end (as a GPU lease would run it: a
source checkout with no installation), and the runner's bookkeeping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from iecl.cli import main
from iecl.profiling.report import document
from iecl.profiling.report.parts import LEVERS
from iecl.profiling.report.plan import DRY_RUN, FULL, PART_NAMES, PARTS, share

ROOT = Path(__file__).resolve().parent.parent
COMPILE_PARTS = {p.name for p in PARTS if p.optional}


def _report(tmp_path: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python3 CHECKOUT report ...`, from a folder whose own model.py, train.py
    and pipeline/ would shadow ours if anything imported them as top-level names."""
    cwd = cwd or tmp_path / "user"
    cwd.mkdir(exist_ok=True)
    for decoy in ("model.py", "train.py"):
        (cwd / decoy).write_text("raise SystemExit('the user\\'s own module was imported')\n")
    (cwd / "pipeline").mkdir(exist_ok=True)
    (cwd / "pipeline" / "__init__.py").write_text("raise SystemExit('the user\\'s own package was imported')\n")
    return subprocess.run([sys.executable, str(ROOT), "report", *args], cwd=cwd, check=False, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_dry_run_runs_every_part_from_a_plain_checkout(tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    # A budget beyond the dry run's default (5 min), still inside _report's 10-minute timeout: a machine
    # made twice as slow by other work slows the parts, it does not stop them (only the compile parts are capped).
    proc = _report(tmp_path, "--out", str(out), "--work", str(work), "--dry-run", "--pack", "--budget-minutes", "9")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    record = json.loads((out / "report.json").read_text())
    for name in PART_NAMES:
        status = record["parts"][name]["status"]
        # torch.compile cannot warm up within a dry run's seconds on a CPU: stopped, reported, not fatal
        assert status == "ok" or (name in COMPILE_PARTS and status == "over budget"), (name, record["parts"][name])
        assert (out / "logs" / f"{name}.log").exists()
        assert f"| {name} | {status} |" in (out / "report.md").read_text()
    machine = json.loads((out / "machine.json").read_text())
    assert machine["iecl_package"] == str(ROOT)  # the checkout ran, not an installed copy
    assert machine["matmul_bf16_tflops"] > 0 and machine["copy_gb_per_s"] > 0
    # The figures in report.md are the parts' own numbers.
    md = (out / "report.md").read_text()
    loader = json.loads((out / "loader.json").read_text())
    assert {r["backend"] for r in loader["runs"]} == {"pil", "dali", "ffcv"}
    assert all("error" not in r for r in loader["runs"])
    ratio = document.dali_over_pil(loader)["ratio"]
    assert f"{ratio:.2f}x" in md
    # DALI's faster decode mode of the run, decoding alone for it, and (on a CPU) no hw_decoder_load sweep.
    [modes] = loader["findings"]["decode_modes"]
    assert f"DALI decode modes: **{modes['winner']}** was faster than {modes['loser']}" in md
    [only] = loader["decode_only"]
    assert "error" not in only and only["decode_only"] and only["label"] == f"dali/{modes['winner']}/decode-only"
    assert only["img_per_s"] > 0 and only["img_per_s_stats"]["n"] == min(DRY_RUN.loader_repeats, 3)
    [share] = loader["findings"]["decode_share"]
    assert f"| {only['label']} | cpu (libjpeg-turbo) |" in md and f"{100 * share['share']['value']:.0f}% (" in md
    assert loader["hw_decoder_load"]["runs"] == [] and "dali.hw_decoder_load: not measured: on cpu" in md
    [other] = loader["executor"]  # the other DALI executor, on the faster mode
    assert other["exec_dynamic"] is True and other["label"] == f"dali/{modes['winner']} dynamic"
    assert f"- DALI executor (dali/{modes['winner']} dynamic): dynamic" in md
    r50 = json.loads((out / "profile-r50.json").read_text())
    assert r50["backbone"] == DRY_RUN.r50 and r50["batch_size"] == DRY_RUN.batch_size and r50["saib"]
    assert r50["data"].startswith("dali loader")  # the real loader, where DALI imports
    assert f"{100 * r50['step_ms']['model_only'] / r50['step_ms']['wall_clock']:.0f}%" in md
    compare = json.loads((out / "compare.json").read_text())
    assert compare["complete"] and len(compare["rows"]) == 10
    assert all("loader" in row and "model_only" in row for row in compare["rows"])
    in_step = json.loads((out / "saib-in-step.json").read_text())
    assert in_step["triton"]["saib_impl"] == "triton" and "saib_bwd" in in_step["triton"]["stages"]
    levers = json.loads((out / "levers.json").read_text())
    assert [label for label, p in levers.items() if isinstance(p, dict)] == [label for label, _ in LEVERS]
    for label, extra in LEVERS:
        assert set(extra) <= set(levers[label]["overrides"]) and levers[label]["step_ms"]["model_only"] > 0
    for label, extra in LEVERS[1:-1]:  # each row names what differs from the defaults
        assert f"| {label} | {' '.join(extra)} | {document._ms(levers[label], 'model_only')} |" in md
    saib = json.loads((out / "saib.json").read_text())
    assert set(saib["results"]) == {"reference", "triton"} and saib["config"]["weights"] == "channels_last"
    export = json.loads((out / "export.json").read_text())  # torchvision, timm: not on this CPU machine
    assert export["tensors"] > 100 and set(export["libraries"]) == {"torchvision", "timm"}
    anchor = json.loads((out / "anchor.json").read_text())
    assert all(row["img_per_s"] > 0 for row in anchor["models"].values())
    # Every timing carries its spread; the checks have their section.
    assert r50["step_ms_stats"]["wall_clock"]["n"] == DRY_RUN.profile_repeats and "flags" in r50
    assert compare["repeats"] == DRY_RUN.compare_repeats and "flags" in compare
    assert all(r["img_per_s_stats"]["n"] == DRY_RUN.loader_repeats for r in loader["runs"])
    assert all(row["step_ms_stats"]["n"] == DRY_RUN.anchor_repeats for row in anchor["models"].values())
    assert "## Checks" in md and "noise" in md and "(min-max)" in md
    for png in ("loader.png", "steps.png", "compare.png"):
        with Image.open(out / png) as image:
            image.verify()
    with tarfile.open(tmp_path / "report.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"report/{f}" for f in ("report.md", "report.json", "compare.png", "logs/compare.log")} <= names
    # Every part's progress reached the console as it ran.
    assert f"[{len(PART_NAMES)}/{len(PART_NAMES)}] {PART_NAMES[-1]}" in proc.stdout and "compare: iecl compare: simsiam +SAIB" in proc.stdout


@pytest.mark.slow
def test_a_failing_part_is_recorded_and_the_rest_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "report"
    proc = _report(tmp_path, "--out", str(out), "--dry-run", "--data", str(empty), "--parts", "data", "loader", "export")
    assert proc.returncode == 1, proc.stdout[-3000:]
    parts = json.loads((out / "report.json").read_text())["parts"]
    assert parts["data"]["status"] == "failed" and "no images" in parts["data"]["error"].lower()
    assert parts["loader"] == {**parts["loader"], "status": "skipped"} and "no data" in parts["loader"]["why"]
    assert parts["export"]["status"] == "ok"
    md = (out / "report.md").read_text()
    assert "| data | failed |" in md and "| loader | skipped |" in md and "Not measured." in md
    # The same folder takes more parts of the same plan, and keeps the earlier ones.
    proc = _report(tmp_path, "--out", str(out), "--dry-run", "--data", str(empty), "--parts", "anchor")
    parts = json.loads((out / "report.json").read_text())["parts"]
    assert set(parts) == {"data", "loader", "export", "anchor"} and parts["anchor"]["status"] == "ok"
    # ... but not a report of another plan.
    assert main(["report", "--out", str(out), "--data", str(empty), "--parts", "machine"]) == 2


def test_a_failed_part_is_named_by_its_exception_not_its_progress_bar(tmp_path):
    """As logged by a part that failed inside a progress bar (Triton's interpreter
    on torch 2.11): the bar is redrawn after the traceback, its last line."""
    from iecl.profiling.report.runner import _last_error

    log = tmp_path / "saib.log"
    log.write_text("bench saib:   0%|          | 0/6 [00:00<?, ?run/s]\rbench saib:  50%|#####     | 3/6 [triton]"
                   "Traceback (most recent call last):\n  File \"k.py\", line 9, in k\n"
                   "TypeError: only 0-dimensional arrays can be converted to Python scalars\n\n"
                   "The above exception was the direct cause of the following exception:\n\n"
                   "triton.runtime.errors.InterpreterError: TypeError('only 0-dimensional arrays')\n"
                   "bench saib:  50%|#####     | 3/6 [00:00<00:00,  3.68run/s, triton]\n")
    assert _last_error(log) == "triton.runtime.errors.InterpreterError: TypeError('only 0-dimensional arrays')"
    log.write_text("making synthetic images: 100%|##########| 32/32\nno images under /data\n")
    assert _last_error(log) == "no images under /data"
    log.write_text("")
    assert _last_error(log) == "exited with no output"


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path / "r"), "--parts", "nope"]) == 2
    assert "unknown report part 'nope'" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path / "r"), "--budget-minutes", "0.1"]) == 2
    assert main(["report", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_budget_shares_follow_the_estimates():
    estimates = {"a": 10, "b": 30, "c": 60}
    assert share(100, ["a", "b", "c"], estimates) == pytest.approx(10)
    assert share(90, ["b", "c"], estimates) == pytest.approx(30)  # a used exactly its share
    assert share(95, ["b", "c"], estimates) == pytest.approx(95 / 3)  # what a did not use passes on
    assert share(-5, ["c"], estimates) == 0
    assert share(100, ["c"], estimates, max_share=1.5) == pytest.approx(90)
    for scale in (FULL, DRY_RUN):
        assert set(scale.estimates) == set(PART_NAMES)
    assert FULL.batch_size == 256 and FULL.image_size == 224 and FULL.patch == 16 and FULL.images >= 10_000


def test_report_help_lists_the_parts(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = capsys.readouterr().out
    assert "--dry-run" in text and all(name in text for name in PART_NAMES)


@pytest.mark.slow
def test_the_device_script_runs_the_checkout(tmp_path):
    out = tmp_path / "r"
    env = {**os.environ, "IECL_REPORT_OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "profiling" / "scripts" / "gpu_report.sh"), "--dry-run", "--parts", "export",
                           "--work", str(tmp_path / "work")], env=env, cwd=tmp_path, check=False, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["parts"]["export"]["status"] == "ok"
    assert (tmp_path / "r.tar.gz").stat().st_size > 0


def test_report_chart_labels_stay_inside_the_figure():
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from iecl.profiling import stats

    values = [stats.summary([1.0, 2.0, 3.0]), stats.summary([90_000.0, 120_000.0, 400_000.0]), stats.summary([5.0])]
    fig = document.barh_figure(["a very long label for the first bar " * 2, "b", "c"], values, "images/s",
                               "a title long enough to wrap, " * 8, "Bars: the median of 3 windows; " * 6)
    try:
        fig.canvas.draw()
        renderer, frame = fig.canvas.get_renderer(), fig.bbox
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        assert any(t.get_text() == "120,000" for t in texts)
        for t in texts:
            box = t.get_window_extent(renderer)
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, t.get_text()
        axes = fig.axes[0].get_window_extent(renderer)
        for t in fig.axes[0].texts:  # the value labels, inside the panel
            assert t.get_window_extent(renderer).x1 <= axes.x1, t.get_text()
    finally:
        plt.close(fig)


def test_the_checks_section_gathers_every_parts_flags(tmp_path):
    flag = {"check": "loader_faster_than_model", "subject": "iecl resnet50 +SAIB", "message": "impossible"}
    (tmp_path / "profile-r50.json").write_text(json.dumps({"flags": [flag]}))
    (tmp_path / "saib-in-step.json").write_text(json.dumps({"triton": {"step_ms": {}, "flags": [flag]}}))
    (tmp_path / "compare.json").write_text(json.dumps({"flags": []}))
    lines = "\n".join(document._checks(tmp_path))
    assert "(part profile-r50)" in lines and "(part saib-in-step/triton)" in lines
    assert "loader_faster_than_model" in lines
    assert document._checks(tmp_path / "empty")[-1] == "No check failed."


def test_the_loader_section_states_the_decode_findings():
    """report.md's loader section from GPU-shaped records (made up here, since a
    CPU cannot run the hw_decoder_load sweep): the decode winner, decoding
    alone beside the loader, and the sweep against the shipped value."""
    from iecl.profiling import stats
    from iecl.profiling.bench_loader import DEFAULT_HW_DECODER_LOAD as SHIPPED
    from iecl.profiling.bench_loader import findings

    def run(decode, rates, hw=SHIPPED, only=False):
        label = f"dali/{decode}" + ("/decode-only" if only else "") + ("" if hw == SHIPPED else f" hw={hw:g}")
        return {"backend": "dali", "decode": decode, "label": label, "decode_only": only, "decoder": "mixed",
                "hw_decoder_load": hw, "img_per_s": stats.summary(rates)["median"],
                "img_per_s_stats": stats.summary(rates), "step_ms_median": 50.0, "step_ms_p90": 55.0,
                "peak_host_mb": 900.0, "peak_gpu_mb": 4000.0}

    runs = [run("shared", [5000, 5100, 5200, 5150]), run("window", [5900, 6000, 6100, 6050])]
    only = [run("window", [9000, 9100, 9200], only=True)]
    sweep = [run("window", [4000, 4100, 4050], hw=0.0), run("window", [6000, 6100, 6200], hw=0.9)]
    r = {"device": "cuda", "batch_size": 256, "image_size": 224, "steps": 5, "repeats": 4, "warmup": 5, "workers": 16,
         "runs": runs, "skipped": {}, "decode_only": only,
         "hw_decoder_load": {"decode": "window", "default": SHIPPED, "values": [0.0, SHIPPED, 0.9], "runs": sweep},
         "findings": findings(runs + only + sweep)}
    md = "\n".join(document._loader(r))
    assert ("**window** was faster than shared, 6,025 vs 5,125 img/s: 1.18x (1.13-1.22x), beyond noise "
            "(the shipped data.decode is shared: this run says window)") in md
    assert "| dali/window/decode-only | mixed (nvJPEG) | 3 | 9,100 (9,000-9,200) | 6,025 (5,900-6,100) | 66% (" in md
    assert f"| {SHIPPED:g} (shipped) | 4 | 6,025 (5,900-6,100) | - |" in md and "| 0 | 3 | 4,050" in md
    assert f"- fastest: 0.9, 1.01x (0.98-1.05x) the shipped {SHIPPED:g}, within noise." in md


def test_the_compiled_fused_views_line_compares_with_the_two_call_step(tmp_path):
    """Both views in one call, compiled, against profile-r18-compile from the
    same folder: a speed-up above 1 where one call is faster."""
    from iecl.profiling import stats

    def profile(name: str, samples: list[float]) -> None:
        record = {"backbone": "resnet18", "step_ms": {"model_only": samples[1]}, "warmup_seconds": 41.0,
                  "step_ms_stats": {"model_only": stats.summary(samples)}}
        (tmp_path / f"{name}.json").write_text(json.dumps(record))

    assert "not measured" in document._fused_compiled(tmp_path, {})[0]
    profile("profile-r18-compile", [60.0, 61.0, 62.0])
    profile("profile-r18-compile-fused", [50.0, 50.5, 51.0])
    [line] = document._fused_compiled(tmp_path, {})
    assert "50.5 (50.0-51.0) ms, two calls 61.0 (60.0-62.0) ms" in line and "warm-up 41 s" in line
    assert f"{61.0 / 50.5:.2f}x" in line
