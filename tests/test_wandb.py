"""Optional Weights & Biases logging (log.wandb=true), in wandb's offline mode."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import tiny_config

from iecl.pipeline import open_images
from iecl.train.config import ConfigError, resolve_runtime
from iecl.train.loop import pretrain
from iecl.train.metrics import read_metrics

pytest.importorskip("wandb")


def test_offline_run_records_every_logged_key_under_the_run_folder(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tiny_data, tmp_path, {"train": {"max_steps": 3},
                                            "log": {"wandb": True, "wandb_mode": "offline", "wandb_project": "t"}})
    run_dir = tmp_path / "iecl-resnet18-20261201-000000"
    run_dir.mkdir()
    pretrain(cfg, run_dir, open_images(tiny_data), progress=False)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_dir.name)  # the run's id is the folder's name
    record = next(runs[0].glob("*.wandb")).read_bytes()
    rows = read_metrics(run_dir)
    assert len(rows) == 3
    for key in rows[0]:
        if key not in ("step", "time"):
            assert key.encode() in record, key  # every logged scalar went to W&B as well
    assert b'"iecl"' in record  # with the run's config


def test_wandb_missing_is_refused_before_the_run(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_data, tmp_path, {"log": {"wandb": True}})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install wandb"):
        resolve_runtime(cfg, cuda_available=False, bf16_supported=False)
