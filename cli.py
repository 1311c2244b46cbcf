"""The `iecl` command: train's commands and profiling's in one parser.

This is the composition root: `iecl.train` never imports `iecl.profiling`
(profiling observes training), so the two sets of commands meet here."""

from __future__ import annotations

from iecl.profiling.cli import COMMANDS as PROFILING_COMMANDS
from iecl.train import cli as train_cli


def main(argv: list[str] | None = None) -> int:
    return train_cli.main(argv, extra_commands=PROFILING_COMMANDS)
