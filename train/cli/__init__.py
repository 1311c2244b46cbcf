"""`iecl`: the command line of train/ (pretrain, the dataset tools, the
evaluations); iecl.cli adds profiling's commands.

Errors a user can cause (a bad config key, a missing data folder, an
unreadable image, an unusable run directory or checkpoint: a `UserError`) are
printed as one line, `iecl <command>: error: ...`, with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from iecl.pipeline.errors import UserError
from iecl.train.cli.data import add_commands as add_data_commands
from iecl.train.cli.eval import add_commands as add_eval_commands
from iecl.train.cli.export import add_commands as add_export_commands
from iecl.train.cli.mi import add_commands as add_mi_commands
from iecl.train.cli.pretrain import add_commands as add_pretrain_commands
from iecl.train.signals import EXIT_ON_SIGNAL, Interrupted

__all__ = ["EXIT_ON_SIGNAL", "main"]


def main(argv: list[str] | None = None, extra_commands=()) -> int:
    """`iecl ARGV`; `extra_commands` are more `register(subparsers)` functions
    (iecl.cli passes profiling's: train/ never imports profiling/)."""
    parser = argparse.ArgumentParser(prog="iecl", description="IE-CL self-supervised pretraining pipeline.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_pretrain_commands(commands)
    add_data_commands(commands)
    add_eval_commands(commands)
    add_export_commands(commands)
    add_mi_commands(commands)
    for register in extra_commands:
        register(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as err:
        print(f"iecl {args.command}: {_rank_tag()}error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:  # pretrain's signals: a quiet exit, one line
        print(f"iecl {args.command}: {_rank_tag()}{stop}", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:  # Ctrl-C in any other command: nothing to save
        print(f"iecl {args.command}: {_rank_tag()}interrupted", file=sys.stderr)
        return EXIT_ON_SIGNAL["SIGINT"]


def _rank_tag() -> str:
    """'rank N: ' in the processes of a torchrun launch other than rank 0 (each prints its own errors)."""
    rank = os.environ.get("RANK", "0")
    return f"rank {rank}: " if rank != "0" and os.environ.get("WORLD_SIZE", "1") != "1" else ""


if __name__ == "__main__":
    sys.exit(main())
