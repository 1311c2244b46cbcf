"""Run metrics: one JSON object per logged step in `metrics.jsonl`, mirrored to
TensorBoard event files in `tb/` and, with log.wandb=true, to a Weights &
Biases run (its files under `wandb/` in the run folder; the run's id is the
folder's name, so a resumed run continues the same W&B run)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

NOT_SCALARS = ("step", "epoch", "time")


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None, wandb=None, config: dict | None = None) -> None:
        """`wandb`: the config's `log` section when log.wandb is on, else None."""
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None:
            self._drop_after(resume_step)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run, closed by close()
        # purge_step hides TensorBoard events logged after the checkpoint we resumed from.
        purge = resume_step + 1 if resume_step is not None else None
        self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge)
        self.wandb = _start_wandb(Path(run_dir), wandb, config) if wandb is not None else None

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
        scalars = {k: v for k, v in row.items() if k not in NOT_SCALARS and isinstance(v, (int, float))}
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, row["step"])
        if self.wandb is not None:
            self.wandb.log({**scalars, "epoch": row.get("epoch")}, step=row["step"])

    def close(self) -> None:
        self.file.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir: Path, log, config: dict | None):
    import wandb

    run_id = re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name)  # stable: a resume continues the same W&B run
    return wandb.init(project=log.wandb_project, name=log.wandb_name or run_dir.name, id=run_id, resume="allow",
                      dir=str(run_dir), mode=log.wandb_mode, config=config,
                      settings=wandb.Settings(console="off"))  # our own output stays as it is


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
