"""`iecl bench loader` and `iecl bench saib` run at toy size and write their JSON."""

from __future__ import annotations

import json

import pytest
import torch

from iecl.cli import main
from iecl.profiling.bench_loader import process_tree_rss


def test_bench_loader_pil_writes_json(capsys, tmp_path, tiny_data):
    out = tmp_path / "bench.json"
    code = main(["bench", "loader", "--backend", "pil", "--data", str(tiny_data), "--batch-size", "8",
                 "--image-size", "32", "--steps", "4", "--repeats", "2", "--warmup", "2", "--workers", "1",
                 "--device", "cpu", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "img/s" in table and "pil" in table
    record = json.loads(out.read_text())
    for key in ("backend", "device", "batch_size", "img_per_s", "cpu_threads", "peak_host_mb", "peak_gpu_mb"):
        assert key in record
    assert record["backend"] == "pil" and record["device"] == "cpu" and record["steps"] == 4 and record["repeats"] == 2
    assert record["img_per_s_stats"]["n"] == 2 and record["step_ms_stats"]["n"] == 8  # windows; every timed step
    assert record["img_per_s"] == pytest.approx(record["img_per_s_stats"]["median"], abs=0.05)
    assert "median of 2 windows of 4 steps" in table
    assert record["img_per_s"] > 0 and record["peak_host_mb"] > 50 and record["peak_gpu_mb"] is None
    assert "note: 10 steps span 1.7 epochs" in table  # 48 images / batch 8 = 6 batches per epoch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_loader_refuses_cuda_without_a_gpu(capsys, tiny_data):
    assert main(["bench", "loader", "--data", str(tiny_data), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_process_tree_rss_counts_this_process():
    assert process_tree_rss() > 10 * 2**20


def test_bench_saib_reference_at_toy_size(capsys, tmp_path):
    out = tmp_path / "saib.json"
    code = main(["bench", "saib", "--batch-size", "4", "--image-size", "16", "--patch", "8", "--dtype", "fp32",
                 "--device", "cpu", "--iters", "2", "--warmup", "1", "--impls", "reference", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and "forward_backward" in captured.out and "min-max ms" in captured.out
    assert "bench saib" in captured.err  # the progress bar
    record = json.loads(out.read_text())
    assert record["results"]["reference"]["forward_ms_stats"]["n"] == 2 and record["flags"] == []
    assert main(["bench", "saib", "--impls", "nope"]) == 2
    assert "unknown --impls" in capsys.readouterr().err


def test_bench_loader_dali_decode_only_and_decode_modes(capsys, tmp_path, tiny_data):
    """--decode-only times DALI's decoding alone beside each loader run; with two
    --decode modes the output names the faster; --hw-decoder-load on a CPU runs
    one value and says that the option does nothing there."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "dali.json"
    code = main(["bench", "loader", "--backend", "dali", "--decode", "shared", "window", "--decode-only",
                 "--hw-decoder-load", "0", "0.9", "--data", str(tiny_data), "--batch-size", "8", "--image-size", "32",
                 "--steps", "2", "--repeats", "3", "--warmup", "1", "--workers", "1", "--device", "cpu",
                 "--no-progress", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    record = json.loads(out.read_text())
    runs = record["runs"]
    assert [r["label"] for r in runs] == ["dali/shared", "dali/shared/decode-only", "dali/window",
                                          "dali/window/decode-only"]
    assert [r["decode_only"] for r in runs] == [False, True, False, True]
    assert all(r["img_per_s"] > 0 and r["img_per_s_stats"]["n"] == 3 for r in runs)
    assert all(r["decoder"] == "cpu" and r["hw_decoder_load"] is None for r in runs)  # not applied on a CPU
    found = record["findings"]
    assert set(found) == {"decode_modes", "decode_share"}  # no hw_decoder_load sweep on a CPU
    [modes] = found["decode_modes"]
    assert {modes["winner"], modes["loser"]} == {"shared", "window"} and modes["ratio"]["value"] >= 1
    assert [s["decode"] for s in found["decode_share"]] == ["shared", "window"]
    for share, (loader, only) in zip(found["decode_share"], [(runs[0], runs[1]), (runs[2], runs[3])]):
        assert share["share"]["value"] == pytest.approx(loader["img_per_s_stats"]["median"]
                                                        / only["img_per_s_stats"]["median"])
    assert "does nothing on cpu" in text and f"decode: {modes['winner']} beat {modes['loser']}" in text
    assert "of the loader's time per image" in text and "dali/window/decode-only" in text


def test_bench_loader_dali_exec_dynamic_times_both_executors(capsys, tmp_path, tiny_data):
    """--exec-dynamic: each DALI run again with the dynamic executor, and a
    sentence saying which was faster (dali.exec_dynamic's default is from it)."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "dali.json"
    code = main(["bench", "loader", "--backend", "dali", "--exec-dynamic", "--data", str(tiny_data), "--batch-size",
                 "8", "--image-size", "32", "--steps", "2", "--repeats", "3", "--warmup", "1", "--workers", "1",
                 "--device", "cpu", "--no-progress", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    assert [(r["label"], r["exec_dynamic"]) for r in runs] == [("dali/shared", False), ("dali/shared dynamic", True)]
    [row] = json.loads(out.read_text())["findings"]["executor"]
    static, dynamic = (r["img_per_s_stats"]["median"] for r in runs)
    assert row["ratio"]["value"] == pytest.approx(dynamic / static) and row["label"] == "dali/shared dynamic"
    assert "executor (dali/shared dynamic): dynamic" in text


def test_findings_compare_like_with_like_across_executors():
    """The dynamic-executor runs have their own finding and change no other:
    the decode modes are judged on the shipped executor's runs only."""
    from iecl.profiling import stats
    from iecl.profiling.bench_loader import findings

    def run(decode, rates, dynamic=False):
        return {"backend": "dali", "decode": decode, "decode_only": False, "hw_decoder_load": None,
                "exec_dynamic": dynamic, "img_per_s": stats.summary(rates)["median"],
                "img_per_s_stats": stats.summary(rates), "label": f"dali/{decode}" + (" dynamic" if dynamic else "")}

    found = findings([run("shared", [500, 510, 520]), run("window", [400, 405, 410]),
                      run("window", [700, 705, 710], dynamic=True)])
    [modes] = found["decode_modes"]
    assert modes["winner"] == "shared" and modes["ratio"]["value"] == pytest.approx(510 / 405)
    [executor] = found["executor"]
    assert executor["decode"] == "window" and executor["ratio"]["value"] == pytest.approx(705 / 405)
    assert executor["beyond_noise"] is True


def test_bench_loader_dali_flags_need_dali(capsys, tiny_data):
    assert main(["bench", "loader", "--data", str(tiny_data), "--decode-only", "--device", "cpu"]) == 2
    assert "add dali to --backend" in capsys.readouterr().err


def test_bench_loader_help_shows_the_shipped_hw_decoder_load(capsys):
    from iecl.pipeline import DaliOptions

    with pytest.raises(SystemExit):
        main(["bench", "loader", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: the shipped {DaliOptions().hw_decoder_load:g})" in text and "--decode-only" in text


def test_findings_of_a_hw_decoder_load_sweep():
    """findings() on GPU-shaped records (made up here: a CPU cannot run the sweep)."""
    from iecl.profiling import stats
    from iecl.profiling.bench_loader import DEFAULT_HW_DECODER_LOAD, findings

    def run(decode, rates, hw, only=False):
        return {"backend": "dali", "decode": decode, "decode_only": only, "decoder": "mixed", "hw_decoder_load": hw,
                "img_per_s": stats.summary(rates)["median"], "img_per_s_stats": stats.summary(rates)}

    runs = [run("shared", [500, 510, 520], DEFAULT_HW_DECODER_LOAD), run("window", [400, 405, 410], DEFAULT_HW_DECODER_LOAD),
            run("shared", [900, 910, 920], DEFAULT_HW_DECODER_LOAD, only=True),
            run("shared", [300, 310, 320], 0.0), run("shared", [600, 610, 620], 0.9),
            {"backend": "dali", "decode": "shared", "hw_decoder_load": 0.5, "error": "failed"}]
    found = findings(runs)
    assert found["decode_modes"][0]["winner"] == "shared" and found["decode_modes"][0]["beyond_noise"] is True
    assert found["decode_share"][0]["share"]["value"] == pytest.approx(510 / 910)
    [sweep] = found["hw_decoder_load"]
    assert [r["value"] for r in sweep["runs"]] == [0.0, DEFAULT_HW_DECODER_LOAD, 0.9] and sweep["best"] == 0.9
    assert sweep["best_over_default"]["value"] == pytest.approx(610 / 510) and sweep["beyond_noise"] is True
