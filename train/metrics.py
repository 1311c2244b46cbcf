"""Run metrics: one JSON object per logged step in `metrics.jsonl`, mirrored to
TensorBoard event files in `tb/` and, with log.wandb=true, to a Weights &
Biases run (its files under `wandb/` in the run folder; the run's id is the
folder's name, so a resumed run continues the same W&B run)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from iecl.pipeline.errors import UserError

NOT_SCALARS = ("step", "epoch", "time")


class MetricsWriteError(UserError, OSError):
    """metrics.jsonl cannot take a row (a full disk, a folder made read-only)."""


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
        """Rows logged after the checkpoint belong to steps that will run again;
        a line that is not a whole row (a write cut short by a full disk or a
        kill) is dropped too, with a warning, so the log stays readable."""
        if not self.path.exists():
            return
        rows, damaged = _rows(self.path.read_bytes())
        if damaged:
            print(f"iecl: warning: {self.path}: dropped {damaged} damaged line(s) (a write cut short by a full disk "
                  "or a kill); the rows before and after are kept", file=sys.stderr)
        kept = [line for line, row in rows if row.get("step", 0) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        try:  # one write per row: a failure leaves at most one partial last line, dropped on resume
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as err:
            raise MetricsWriteError(
                f"cannot append step {row.get('step')}'s row to {self.path}: {err.strerror or err}; "
                f"free space (or fix the folder) and continue with --resume {self.path.parent}"
            ) from None
        scalars = {k: v for k, v in row.items() if k not in NOT_SCALARS and isinstance(v, (int, float))}
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, row["step"])
        if self.wandb is not None:
            self.wandb.log({**scalars, "epoch": row.get("epoch")}, step=row["step"])

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # the buffered rest of a row whose write already failed (and was reported)
            pass
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
    """The logged rows (a damaged line, from an interrupted write, left out)."""
    rows, _ = _rows((Path(run_dir) / "metrics.jsonl").read_bytes())
    return [row for _, row in rows]


def _rows(data: bytes) -> tuple[list[tuple[str, dict]], int]:
    """metrics.jsonl's bytes -> ([(line, row)], how many lines are not whole rows)."""
    rows, damaged = [], 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            damaged += 1
            continue
        if isinstance(row, dict):
            rows.append((raw.decode("utf-8"), row))
        else:
            damaged += 1
    return rows, damaged
