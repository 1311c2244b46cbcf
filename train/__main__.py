"""`python -m iecl.train ...` is `iecl pretrain ...` (what torchrun launches)."""

import sys

from iecl.train.cli import main

sys.exit(main(["pretrain", *sys.argv[1:]]))
