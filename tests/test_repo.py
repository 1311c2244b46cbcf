"""The repository's promises to a new user."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert len(ci) == 1
    assert ci[0] in (ROOT / "README.md").read_text()


def test_shipped_configs_are_reachable_from_the_repository_root():
    assert sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) == [
        "byol_r50.yaml", "imagenet_r18.yaml", "imagenet_r50.yaml", "mocov2_r50.yaml", "simclr_r50.yaml",
        "simsiam_r50.yaml", "smoke.yaml",
    ]
