"""`iecl mi`: the post-training mutual-information estimate; it lives in train/mi.py."""

from iecl.train.mi import add_commands

__all__ = ["add_commands"]
