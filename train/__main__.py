"""`python -m train ...` is `iecl pretrain ...` (what torchrun launches)."""

import sys

from train.cli import main

sys.exit(main(["pretrain", *sys.argv[1:]]))
