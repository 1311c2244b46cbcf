"""`iecl profile` and `iecl compare` at toy sizes on the CPU: the step they time
is the training step, the breakdown adds up to the step, and the compare
outputs (table, JSON, chart) are written and say what was measured. No test
asserts a timing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_config, tiny_overrides

from iecl.cli import main
from iecl.pipeline import open_images
from iecl.profiling.compare import (
    added_percent,
    compare,
    epoch_seconds,
    markdown,
    overheads,
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
    r = profile(cfg, open_images(tiny_data), steps=3, warmup=1, isolate_iters=2, log=lambda _: None)
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


def test_profile_stages_follow_the_method():
    """No SAIB: no SAIB stages; SimCLR has no target encoder."""
    cfg = _cfg("method.name=simclr", "saib.enabled=false")
    r = profile(cfg, None, steps=2, warmup=1, isolate_iters=1, log=lambda _: None)
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
def test_profile_command_writes_json_and_trace(tmp_path):
    out, trace = tmp_path / "profile.json", tmp_path / "trace.json"
    code = main(["profile", *tiny_overrides(), "--data-on-device", "--steps", "1", "--warmup", "1",
                 "--isolate-iters", "1", "--trace", str(trace), "--trace-steps", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["steps"] == 1 and report["command"].startswith("iecl")
    assert "traceEvents" in json.loads(trace.read_text())


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
    assert over["iecl"] == pytest.approx({"model_only": 10.0, "loader": 5.0})
    assert over["simclr"] == pytest.approx({"model_only": 15.0, "loader": 5.0})
    assert "byol" not in over  # no row without SAIB to compare with
    assert over["mean"] == pytest.approx({"model_only": 12.5, "loader": 5.0})


@pytest.mark.slow
def test_compare_writes_table_json_and_chart(tiny_data, tmp_path):
    from PIL import Image

    r = compare(None, [*tiny_overrides(), f"data.root={tiny_data}"], methods=("iecl", "simclr"), saib="both",
                images=open_images(tiny_data), steps=1, warmup=1, log=lambda _: None)
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
                 "--steps", "1", "--warmup", "1", "--epoch-images", "1000", "--out", str(tmp_path)])
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
    r = compare(None, tiny_overrides(), methods=("simsiam",), steps=1, warmup=1, log=lambda _: None)
    assert r["rows"][1] == {"method": "simsiam", "saib": True, "error": "out of memory: CUDA out of memory. "
                            "Tried to allocate 2.00 GiB"}
    assert r["saib_overhead"] == {}
    paths = write(r, tmp_path)
    assert "| simsiam | yes | out of memory" in paths["markdown"].read_text()
