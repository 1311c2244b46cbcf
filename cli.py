"""The `iecl` command: train's commands and profiling's in one parser.

This is the composition root: `iecl.train` never imports `iecl.profiling`
(profiling observes training), so the two sets of commands meet here.

A light parser answers first: `iecl --help`, a missing or misspelt command,
and profiling's commands' own --help and argument errors. It imports neither
torch nor train's command modules, which import torch and take 10-20 s to
load on a busy machine. Train's commands appear in it by name and help line
only (TRAIN_COMMANDS; tests/test_cli.py checks that `iecl --help` reads the
same either way). What it accepts then runs through the full parser
(`train.cli.main`), which builds every command as before.
"""

from __future__ import annotations

import argparse
import sys

#: train's commands as `iecl --help` lists them: (name, help), in train.cli's order
TRAIN_COMMANDS = (
    ("pretrain", "pretrain IE-CL or a baseline (no arguments: a one-minute CPU smoke run)"),
    ("make-synthetic", "write a synthetic ImageNet-style JPEG folder"),
    ("validate", "list unreadable images and non-image files of a dataset"),
    ("convert", "convert a dataset to an FFCV .beton file"),
    ("knn", "kNN accuracy of a pretrained checkpoint on labelled images"),
    ("lineval", "linear-probe accuracy of a pretrained checkpoint on labelled images"),
    ("export", "a checkpoint's backbone as a plain ResNet state_dict (torchvision, timm)"),
    ("mi", "post-training mutual-information estimate of a checkpoint's views"),
)
DESCRIPTION = "IE-CL self-supervised pretraining pipeline."


def light_parser() -> argparse.ArgumentParser:
    """`iecl`'s top level with train's commands as placeholders (they take any
    arguments; their own parsers check them) and profiling's in full."""
    from iecl.profiling.cli import COMMANDS as PROFILING_COMMANDS

    parser = argparse.ArgumentParser(prog="iecl", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in TRAIN_COMMANDS:
        commands.add_parser(name, help=text, add_help=False)
    for register in PROFILING_COMMANDS:
        register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = light_parser()
    args, unknown = parser.parse_known_args(argv)  # exits here on --help and argument errors
    if unknown and args.command not in dict(TRAIN_COMMANDS):
        parser.parse_args(argv)  # a profiling command's unknown argument: its own error message, still fast

    from iecl.profiling.cli import COMMANDS as PROFILING_COMMANDS
    from iecl.train import cli as train_cli

    return train_cli.main(argv, extra_commands=PROFILING_COMMANDS)
