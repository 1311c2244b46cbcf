"""The installed package: one import name, `iecl`, whatever the user's own
folder holds (a wheel built from this checkout, installed in a target dir)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_installs_everything_under_iecl_and_ignores_the_users_files(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(wheels.glob("iecl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert all(n.startswith(("iecl/", "iecl-")) for n in names), [n for n in names if not n.startswith("iecl")]
    for needed in ("iecl/__init__.py", "iecl/__main__.py", "iecl/cli.py", "iecl/train/step.py",
                   "iecl/train/configs/imagenet_r50.yaml", "iecl/profiling/report/runner.py"):
        assert needed in names, needed
    assert "iecl/setup.py" not in names and not any("/tests/" in n for n in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)

    user = tmp_path / "research"  # a user's own folder: their model.py, train.py and pipeline/
    (user / "pipeline").mkdir(parents=True)
    for decoy in ("model.py", "train.py", "pipeline/__init__.py"):
        (user / decoy).write_text("raise SystemExit('the user\\'s own module was imported instead of iecl\\'s')\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import iecl, iecl.train.loop, iecl.model.methods, iecl.pipeline, iecl.profiling.report.runner; "
            "print(iecl.__file__); print(sorted(iecl.model.methods.METHODS))")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=user, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0].startswith(str(site))  # the wheel's copy, not the checkout
    assert "iecl" in out.stdout.splitlines()[1]
    for command in (["-m", "iecl", "--help"], ["-m", "iecl.train", "--help"]):
        run = subprocess.run([sys.executable, *command], check=False, cwd=user, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "usage: iecl" in run.stdout, run.stderr[-2000:]


def test_the_metadata_is_in_pyproject_and_agrees_with_the_package():
    import tomllib

    import iecl

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == iecl.__version__
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert any(dep.startswith("torch>=") for dep in project["dependencies"])  # a range: a CUDA build stays
    assert any(dep.startswith("numpy") for dep in project["dependencies"])
    assert {"dali", "ffcv", "kernels", "wandb", "dev"} <= set(project["optional-dependencies"])
    assert project["scripts"]["iecl"] == "iecl.cli:main"
    assert "name=" not in (ROOT / "setup.py").read_text()  # one place for the metadata
