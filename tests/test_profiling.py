"""`iecl profile` and `iecl compare` at toy sizes on the CPU: the step they time
is the training step, the breakdown adds up to the step, and the compare
outputs (table, JSON, chart) are written and say what was measured. No test
asserts a timing."""

from __future__ import annotations

import copy
import json
import statistics

import pytest
import torch
from conftest import tiny_config, tiny_overrides

from iecl.cli import main
from iecl.pipeline import open_images
from iecl.profiling import checks, stats
from iecl.profiling.compare import (
    added_percent,
    compare,
    epoch_seconds,
    markdown,
    overheads,
    sanity_flags,
    steps_per_epoch,
    write,
)
from iecl.profiling.harness import build_harness, load_resolved, resident_views
from iecl.profiling.step_profile import format_report, profile
from iecl.train.config import ConfigError
from iecl.train.loop import pretrain

ISOLATED = ("view_prep", "online_fwd", "backward", "optimizer", "momentum")


def _cfg(*extra: str):
    return load_resolved(None, [*tiny_overrides(), *extra])


# ------------------------------------------------------------- the step


@pytest.mark.parametrize("saib", [True, False])
@pytest.mark.parametrize("method", ["iecl", "mocov2", "simclr", "byol", "simsiam"])
def test_the_profiled_step_is_the_training_step(method, saib, tiny_data, tmp_path):
    """`iecl profile` and `iecl compare` time train/step.py, marked through
    hooks: from the same config and first batch, the profiled step gives the
    losses the loop logs and the same parameters after the update."""
    cfg = tiny_config(tiny_data, tmp_path, {"method": {"name": method}, "saib": {"enabled": saib},
                                            "train": {"max_steps": 1}})
    after: dict = {}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pretrain(cfg, run_dir, open_images(tiny_data), progress=False,
             after_step=lambda pos, m, batch: after.update(copy.deepcopy(m.state_dict())))
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])

    h = build_harness(cfg, open_images(tiny_data), total_steps=1)  # the loop's schedule: max_steps=1
    h.loader.set_epoch(0)
    batch = next(iter(h.loader))
    h.laps.begin()  # marking on: the hooks must not change what is computed
    outcome = h.step(batch.anchor, batch.query, 0)
    h.laps.end_step()
    stages = h.laps.finish()[0]
    h.close()
    assert outcome.updated
    for key, value in outcome.losses.items():
        assert logged[key] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    mine = h.method.state_dict()
    assert set(mine) == set(after)
    for key, value in after.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-6, atol=1e-7, msg=key)
    # ... and every encoder the method names is timed as an encoder, not as "heads and loss".
    assert stages["online_fwd"] > 0
    assert ("target_fwd" in stages) == (method in ("iecl", "mocov2", "byol"))
    assert ("saib_fwd" in stages and "saib_bwd" in stages) == saib


# ------------------------------------------------------------- iecl profile


@pytest.mark.slow
def test_profile_breakdown_adds_up_to_the_step(tiny_data):
    cfg = _cfg(f"data.root={tiny_data}")
    r = profile(cfg, open_images(tiny_data), steps=2, warmup=1, isolate_iters=2, log=lambda _: None, repeats=2)
    stages = r["stages"]
    assert list(stages) == ["data", "view_prep", "saib_fwd", "online_fwd", "target_fwd", "heads_loss", "sync",
                            "backward", "saib_bwd", "optimizer", "momentum"]
    assert all(s["in_place_ms"] >= 0 for s in stages.values())
    assert sum(s["share"] for s in stages.values()) == pytest.approx(1.0)
    # The marks tile the step; the wall clock (synchronised, independent of
    # the marks) must agree within 5% (the loop's host work between steps).
    assert r["parts_over_wall_clock"] == pytest.approx(1.0, abs=0.05)
    assert stages["online_fwd"]["in_place_ms"] > 0 and stages["backward"]["in_place_ms"] > 0
    for stage in (*ISOLATED, "data", "saib_fwd", "saib_bwd", "target_fwd"):
        assert stages[stage]["isolated_ms"] > 0, stage
    assert stages["heads_loss"]["isolated_ms"] is None  # only measured in place
    assert 0 < r["saib_share"] < 1
    assert r["flop_per_step"] > 0 and r["tflops"]["in_place"] > 0
    assert "SAIB forward" in format_report(r)
    # two windows of two steps: the wall clock over windows, a stage over steps, each with its spread
    assert r["step_ms_stats"]["wall_clock"]["n"] == 2 and r["parts_over_wall_clock_stats"]["n"] == 2
    assert stages["online_fwd"]["in_place_ms_stats"]["n"] == 4 and stages["online_fwd"]["isolated_ms_stats"]["n"] == 2
    assert r["loader_efficiency"]["n"] == 2  # a real loader: model-only over with-the-loader
    assert not [f for f in r["flags"] if f["check"].startswith("parts")]  # the marks tile the step
    assert "parts / wall clock per window" in format_report(r)


def test_an_unmarked_step_leaves_no_saib_state_behind():
    """A warm-up step runs with the marks off; the first marked step after it
    must still split its backward at SAIB (it once charged all of it to SAIB)."""
    import itertools

    from iecl.profiling.harness import run_steps

    cfg = _cfg("saib.enabled=true")
    h = build_harness(cfg)
    source = itertools.cycle(resident_views(cfg, h.device))
    run_steps(h, source, 1)  # unmarked, as the warm-up
    _, (marked,) = run_steps(h, source, 1, first_step=1, laps=True)
    assert "backward" in marked and "saib_bwd" in marked


def test_profile_stages_follow_the_method():
    """No SAIB: no SAIB stages; SimCLR has no target encoder."""
    cfg = _cfg("method.name=simclr", "saib.enabled=false")
    r = profile(cfg, None, steps=1, warmup=1, isolate_iters=1, log=lambda _: None, repeats=2)
    assert "saib_fwd" not in r["stages"] and "saib_bwd" not in r["stages"]
    assert "target_fwd" not in r["stages"]
    assert r["data"] == "resident on the device" and r["stages"]["data"]["isolated_ms"] is None
    assert r["saib_share"] == 0


def test_step_flop_counts_the_reference_saib_and_restores_the_switch():
    from iecl.profiling.harness import step_flop

    cfg = _cfg("saib.enabled=true")
    h = build_harness(cfg)
    views = resident_views(cfg, h.device, count=1)[0]
    h.method.saib.impl = "compile"  # any non-reference value must come back unchanged
    with_saib = step_flop(h, *views)
    assert h.method.saib.impl == "compile"
    h_off = build_harness(_cfg("saib.enabled=false"))
    without = step_flop(h_off, *views)
    # SAIB's convolutions: forward 50 * (3 H W) * B^2 (profiling/bench_saib.py), backward twice that.
    saib = 3 * 50 * 3 * 32 * 32 * 8**2
    # And the query now needs its input gradient through the stem: a 7x7/2
    # convolution 3 -> 64 channels onto 16 x 16 outputs, once per query image.
    stem_input_grad = 2 * (16 * 16) * (7 * 7 * 3) * 64 * 8
    assert with_saib - without == saib + stem_input_grad


@pytest.mark.slow
def test_profile_command_writes_json_and_trace(tmp_path, capfd):
    out, trace = tmp_path / "profile.json", tmp_path / "trace.json"
    code = main(["profile", *tiny_overrides(), "--data-on-device", "--steps", "1", "--repeats", "2", "--warmup", "1",
                 "--isolate-iters", "1", "--trace", str(trace), "--trace-steps", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["steps"] == 1 and report["repeats"] == 2 and report["command"].startswith("iecl")
    assert "traceEvents" in json.loads(trace.read_text())
    assert "loader_efficiency" not in report  # no loader: nothing to compare the ceiling with
    printed = "".join(capfd.readouterr())  # file descriptors 1 and 2: where Kineto's C++ writes
    assert "profiler_start" not in printed and "USDT:" not in printed
    assert "profile:   0%" in printed and "/5 [" in printed  # a bar over warm-up and both timings: 1 + 2 x 2 x 1


def test_kineto_markers_are_dropped_and_everything_else_kept(capfd):
    """The filter around torch.profiler drops Kineto's USDT marker lines only."""
    import os

    from iecl.profiling.step_profile import _without_kineto_markers

    with _without_kineto_markers():
        os.write(2, b"USDT:2026-12-02 01:12:29 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"ERROR: a real error\n")
    err = capfd.readouterr().err
    assert "ERROR: a real error" in err and "USDT" not in err


# ------------------------------------------------------------- iecl compare


def test_epoch_projection_by_hand():
    # 1,281,167 / 256 = 5004.56...: 5004 full batches; at 0.25 s each, 1251 s.
    assert steps_per_epoch(1_281_167, 256) == 5004
    assert epoch_seconds(0.25, 256) == pytest.approx(1251.0)
    # Two ranks of 512: 1,281,167 / 1024 = 1251.1...: 1251 steps.
    assert epoch_seconds(0.1, 512, world_size=2) == pytest.approx(125.1)
    assert epoch_seconds(1.0, 100, images=1000) == 10
    assert added_percent(200.0, 218.0) == pytest.approx(9.0)


def test_overheads_by_hand():
    def row(method, saib, model_ms, loader_ms):
        return {"method": method, "saib": saib, "model_only": {"step_ms": model_ms}, "loader": {"step_ms": loader_ms}}

    rows = [row("iecl", False, 100, 120), row("iecl", True, 110, 126),
            row("simclr", False, 200, 200), row("simclr", True, 230, 210), row("byol", True, 50, 50)]
    over = overheads(rows)
    value = {m: {k: v["value"] for k, v in kinds.items()} for m, kinds in over.items()}
    assert value["iecl"] == pytest.approx({"model_only": 10.0, "loader": 5.0})
    assert value["simclr"] == pytest.approx({"model_only": 15.0, "loader": 5.0})
    assert "byol" not in over  # no row without SAIB to compare with
    assert value["mean"] == pytest.approx({"model_only": 12.5, "loader": 5.0})
    assert over["iecl"]["model_only"]["n"] == 1  # older rows: one figure, no spread


# ------------------------------------------------------------- statistics and checks, on known timings


def _timed(*ms):
    return {"step_ms": statistics.median(ms), "step_ms_stats": stats.summary(ms)}


def test_summary_of_known_samples():
    s = stats.summary([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert s["samples"] == [5.0, 1.0, 3.0, 2.0, 4.0]  # in the order they were timed
    one = stats.summary([7.0])
    assert (one["q1"], one["q3"], one["n"]) == (7.0, 7.0, 1)
    assert stats.mapped(s, lambda ms: 1000 / ms)["max"] == pytest.approx(1000.0)  # 1 ms is the fastest
    assert stats.fmt(s) == "3.0 (IQR 2.0-4.0, range 1.0-5.0, n=5)"
    with pytest.raises(ValueError):
        stats.summary([])


def test_the_noise_floor_is_the_spread():
    a, b, far = stats.summary([10, 11, 12]), stats.summary([11.5, 12.5, 13]), stats.summary([20, 21, 22])
    assert stats.within_noise(a, b) is True and stats.within_noise(a, far) is False
    assert stats.within_noise(stats.summary([10]), far) is None  # one window: no spread to judge by
    assert stats.within_noise(stats.summary([10, 10.1]), stats.summary([20, 20.1])) is None  # two: too few
    change = stats.change_percent(a, b)  # medians 11 -> 12.5, ranges overlap
    assert change["value"] == pytest.approx(100 * 1.5 / 11)
    assert change["low"] < 0 < change["high"] and stats.beyond(change, 0.0) is False
    assert "within noise" in stats.fmt_change(change)
    assert "beyond noise" in stats.fmt_change(stats.change_percent(a, far))
    assert "noise not known" in stats.fmt_change(stats.change_percent(stats.summary([1]), stats.summary([2])))
    efficiency = stats.ratio(a, b)
    assert stats.fmt_ratio_percent(efficiency).endswith("within noise of 100%)")


def test_checks_flag_a_loader_faster_than_data_on_the_device_beyond_noise():
    model_only, fast_loader, near = stats.summary([100, 102, 104]), stats.summary([40, 41, 43]), stats.summary([99, 101, 106])
    flag = checks.loader_faster_than_model("iecl +SAIB", model_only, fast_loader)
    assert flag["check"] == "loader_faster_than_model" and "impossible" in flag["message"]
    assert checks.loader_faster_than_model("x", model_only, near) is None  # 100% within noise: no flag
    assert checks.loader_faster_than_model("x", stats.summary([100]), stats.summary([40])) is None  # n=1: not known


def test_checks_flag_a_negative_overhead_beyond_noise_only():
    without = stats.summary([100, 101, 103])
    assert checks.negative_overhead("simclr", without, stats.summary([60, 61, 62]))["check"] == "negative_overhead"
    assert checks.negative_overhead("simclr", without, stats.summary([97, 100, 102])) is None
    assert checks.negative_overhead("simclr", without, stats.summary([120, 121, 122])) is None  # a cost, not a flag
    rows = [{"method": "iecl", "saib": False, "model_only": _timed(100, 101, 103), "loader": _timed(40, 41, 42)},
            {"method": "iecl", "saib": True, "model_only": _timed(60, 61, 62), "loader": _timed(110, 111, 112)}]
    found = {(f["check"], f["subject"]) for f in sanity_flags(rows)}
    assert found == {("loader_faster_than_model", "iecl without SAIB"), ("negative_overhead", "iecl, data on the device")}


def test_checks_flag_parts_that_do_not_add_up():
    assert checks.parts_add_up("p", stats.summary([0.97, 0.99, 1.0])) is None
    assert checks.parts_add_up("p", stats.summary([1.2, 1.3, 1.25]))["check"] == "parts_exceed_step"
    assert checks.parts_add_up("p", stats.summary([0.3, 0.4, 0.5]))["check"] == "parts_fall_short"
    assert checks.parts_add_up("p", stats.summary([0.5, 0.99])) is None  # one window adds up: not beyond noise


def test_checks_flag_in_place_and_isolated_times_two_fold_apart():
    stages = {"a": {"label": "SAIB forward", "in_place_ms": 10.0, "isolated_ms": 4.0, "share": 0.3},
              "b": {"label": "optimizer", "in_place_ms": 5.0, "isolated_ms": 6.0, "share": 0.3},
              "c": {"label": "momentum update", "in_place_ms": 0.1, "isolated_ms": 1.0, "share": 0.001},
              "d": {"label": "heads and loss", "in_place_ms": 3.0, "isolated_ms": None, "share": 0.2}}
    flag = checks.isolated_disagrees("profile", stages)
    assert "SAIB forward" in flag["message"] and "2.5x" in flag["message"]
    assert "optimizer" not in flag["message"] and "momentum" not in flag["message"]  # close; too small to judge
    del stages["a"]
    assert checks.isolated_disagrees("profile", stages) is None


def _extreme_compare(repeats: int) -> dict:
    """A compare result with the issue's numbers: +1,326.6% and -94.9% SAIB costs, efficiency 2,700%."""
    def timing(*ms):
        t = _timed(*ms[:repeats])
        return {**t, "img_per_s": 256e3 / t["step_ms"], "epoch_seconds": 5004 * t["step_ms"] / 1e3}

    rows = [{"method": "iecl", "saib": False, "model_only": timing(100, 90, 130), "loader": timing(3.7, 3.5, 4.0)},
            {"method": "iecl", "saib": True, "model_only": timing(1426.6, 1300, 1500), "loader": timing(40, 38, 45)},
            {"method": "simclr", "saib": False, "model_only": timing(200, 190, 210), "loader": timing(210, 200, 220)},
            {"method": "simclr", "saib": True, "model_only": timing(10.2, 9, 11), "loader": timing(215, 205, 230)}]
    return {"backbone": "resnet50", "batch_size": 256, "image_size": 224, "precision": "bf16", "channels_last": True,
            "compile": False, "saib_impl": "reference", "view_prep": "reference", "loader": "pil (2 workers)",
            "device": "a machine whose title is long enough to test the frame of the figure, " * 2,
            "versions": {}, "steps": 10, "warmup": 5, "repeats": repeats, "epoch_images": 1_281_167,
            "steps_per_epoch": 5004, "rows": rows, "saib_overhead": overheads(rows), "flags": sanity_flags(rows)}


@pytest.mark.parametrize("repeats", [1, 3])
def test_chart_labels_stay_inside_the_figure_whatever_the_values(repeats):
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from iecl.profiling.compare import figure

    fig = figure(_extreme_compare(repeats))
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        frame = fig.bbox
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        assert any("%" in t.get_text() for t in texts)  # the value labels are among them
        for t in texts:
            box = t.get_window_extent(renderer)
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, t.get_text()
        right = fig.axes[1]
        for t in right.texts:  # the value labels stay inside their panel too
            box, panel = t.get_window_extent(renderer), right.get_window_extent(renderer)
            assert panel.y0 <= box.y0 and box.y1 <= panel.y1, t.get_text()
    finally:
        plt.close(fig)


def test_compare_table_says_within_noise_and_lists_the_checks():
    table = markdown(_extreme_compare(3))
    assert "within noise" in table and "## Checks" in table
    assert "loader_faster_than_model" in table and "negative_overhead" in table
    assert "median of 3 windows of 10 steps" in table


@pytest.mark.slow
def test_compare_writes_table_json_and_chart(tiny_data, tmp_path):
    from PIL import Image

    r = compare(None, [*tiny_overrides(), f"data.root={tiny_data}"], methods=("iecl", "simclr"), saib="both",
                images=open_images(tiny_data), steps=1, warmup=1, log=lambda _: None, repeats=2)
    paths = write(r, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert [(row["method"], row["saib"]) for row in data["rows"]] == [
        ("iecl", False), ("iecl", True), ("simclr", False), ("simclr", True)]
    for row in data["rows"]:
        assert row["model_only"]["step_ms"] > 0 and row["loader"]["step_ms"] > 0
        assert row["model_only"]["epoch_seconds"] == pytest.approx(160_145 * row["model_only"]["step_ms"] / 1e3)
    assert set(data["saib_overhead"]) == {"iecl", "simclr", "mean"}
    table = paths["markdown"].read_text()
    assert table.count("\n| iecl |") == 3 and table.count("\n| simclr |") == 3  # two rows + one overhead row
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(paths["chart"]) as png:
        png.verify()
        assert png.size[0] > 500 and png.size[1] > 300
    assert markdown(r) == table


def test_compare_command_model_only(tmp_path):
    code = main(["compare", *tiny_overrides(), "--methods", "byol", "--saib", "on", "--no-loader",
                 "--steps", "1", "--repeats", "2", "--warmup", "1", "--epoch-images", "1000", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["loader"] is None and data["steps_per_epoch"] == 125
    assert "loader" not in data["rows"][0] and data["saib_overhead"] == {}
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_compare_refuses_what_it_sets_itself():
    with pytest.raises(ConfigError, match="--methods"):
        compare(None, [*tiny_overrides(), "method.name=byol"], methods=("iecl",))
    assert main(["compare", *tiny_overrides(), "--methods", "dino", "--no-loader"]) == 2


def test_compare_keeps_going_past_an_out_of_memory_configuration(monkeypatch, tmp_path):
    import iecl.profiling.compare as compare_module

    real = compare_module.measure

    def measure(cfg, *args):
        if cfg.saib.enabled:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(cfg, *args)

    monkeypatch.setattr(compare_module, "measure", measure)
    r = compare(None, tiny_overrides(), methods=("simsiam",), steps=1, warmup=1, log=lambda _: None, repeats=1)
    assert r["rows"][1] == {"method": "simsiam", "saib": True, "error": "out of memory: CUDA out of memory. "
                            "Tried to allocate 2.00 GiB"}
    assert r["saib_overhead"] == {}
    paths = write(r, tmp_path)
    assert "| simsiam | yes | out of memory" in paths["markdown"].read_text()
