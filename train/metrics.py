"""Run metrics: one JSON object per logged step in `metrics.jsonl`, mirrored to
TensorBoard event files in `tb/`."""

from __future__ import annotations

import json
import os
from pathlib import Path

NOT_SCALARS = ("step", "epoch", "time")


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None:
            self._drop_after(resume_step)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run, closed by close()
        # purge_step hides TensorBoard events logged after the checkpoint we resumed from.
        purge = resume_step + 1 if resume_step is not None else None
        self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge)

    def _drop_after(self, step: int) -> None:
        """Rows logged after the checkpoint belong to steps that will run again."""
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in row.items():
            if key not in NOT_SCALARS and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
