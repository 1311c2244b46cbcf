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
