"""`iecl mi`: the post-training mutual-information estimate; it lives in train/mi.py."""

from train.mi import add_commands

__all__ = ["add_commands"]
